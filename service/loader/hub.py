"""Hub sources, metadata first: resolve the revision to a commit, list what the snapshot
holds, read config.json and the safetensors headers and check the disk — all before any
weight byte is fetched — then download with huggingface_hub.

huggingface_hub (2.x) writes each download to a process-unique `<etag>.<id>.incomplete`
file and deletes it on failure, so a loader killed mid-download leaves a partial file that
no later download would use. `resume_partials` finishes those with huggingface_hub's own
`http_get` (a `Range` request from where the file stopped) before the snapshot download
runs, under the same per-blob lock huggingface_hub takes.

The endpoint may not be the Hub (a mirror, a plain-http proxy), so nothing it answers is
taken on trust: the commit, file names, blob ids and sizes of the listing are checked
(`hub_checks`) before any of it is written, every request of a hub operation goes through
`hub_guard` (headers checked, bodies counted against the listing), and what a download
leaves is checked against the listing before it is used.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import threading
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from huggingface_hub import (
    HfApi,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub import constants as hub_constants
from huggingface_hub import errors as hf_errors
from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache
from huggingface_hub.file_download import (
    _cache_commit_hash_for_specific_revision,
    http_get,
    repo_folder_name,
)
from huggingface_hub.utils._fixes import WeakFileLock
from huggingface_hub.utils._headers import build_hf_headers
from huggingface_hub.utils._paths import filter_repo_objects
from huggingface_hub.utils.tqdm import tqdm as hf_tqdm

from service.common.disk import free_bytes, require_room
from service.common.errors import (
    BaseholdError,
    DownloadFailed,
    GatedOrUnauthorized,
    InsufficientStorage,
    InvalidCheckpoint,
    SourceNotFound,
)
from service.common.estimates import Download
from service.common.load.hub_checks import (
    HubAnswerRefused,
    file_name_problem,
    inside,
    is_commit,
    is_etag,
    misfits,
    shown,
    size_cap,
)
from service.common.load.pin import HubPin, PinnedFile
from service.common.load.progress import Phase, Progress
from service.common.load.sources import HubOptions, HubSource, hub_cache_dir, hub_offline
from service.loader.hub_guard import Listed, Watch, watching

log = logging.getLogger("basehold.hub")

# Files a transformers checkpoint never needs: other frameworks' weights, original dumps.
HUB_IGNORE = [
    "*.msgpack",
    "*.h5",
    "*.ot",
    "*.onnx",
    "*.onnx_data",
    "*.tflite",
    "*.gguf",
    "original/*",
    "onnx/*",
    "openvino/*",
    "coreml/*",
]
# huggingface_hub 2.x: `<etag>.<8 hex>.incomplete`; 0.x/1.x: `<etag>.incomplete`.
_PARTIAL = re.compile(r"^(?P<etag>[0-9a-f]{40,64})(?:\.[0-9a-f]{8})?\.incomplete$")


@dataclass(frozen=True)
class PlannedFile:
    name: str
    size: int
    etag: str  # the LFS sha256, or the git blob id: the blob's name in the cache


@dataclass(frozen=True)
class Plan:
    """What a hub source is at one commit, and what of it the cache lacks."""

    source: HubSource
    commit: str
    files: tuple[PlannedFile, ...]
    cache: Path
    cached_folder: Path | None = None  # offline or Hub down: the cached snapshot, as it is

    @property
    def storage(self) -> Path:
        return self.cache / repo_folder_name(repo_id=self.source.repo_id, repo_type="model")

    def cached(self, file: PlannedFile) -> bool:
        return (self.storage / "blobs" / file.etag).exists()

    def missing(self) -> list[PlannedFile]:
        return [f for f in self.files if not self.cached(f)]

    def partial_bytes(self) -> int:
        return sum(size for _, size in partials(self).values())

    @property
    def snapshot(self) -> str:
        return f"{self.source.repo_id}@{self.commit[:12]}"

    def download_bytes(self) -> int:
        """What the download will write: the missing files, less their partial files."""
        if self.cached_folder is not None:
            return 0
        return max(0, sum(f.size for f in self.missing()) - self.partial_bytes())

    def download(self) -> Download | None:
        """For admission: what this snapshot's download will still write, if anything,
        and the cache disk's free space now."""
        needed = self.download_bytes()
        if not needed:
            return None
        return Download(str(self.cache), self.snapshot, needed, free_bytes(self.cache))

    def pin(self) -> HubPin:
        """What admission priced, for the loader that downloads it (`from_pin`)."""
        files = tuple(PinnedFile(name=f.name, size=f.size, etag=f.etag) for f in self.files)
        folder = None if self.cached_folder is None else str(self.cached_folder)
        return HubPin(commit=self.commit, files=files, cached_folder=folder)

    @classmethod
    def from_pin(cls, source: HubSource, pin: HubPin) -> Plan:
        """The plan admission priced, held to the same checks as a hub's listing: the
        serving process carried it, a loader process made it."""
        cache = Path(hub_cache_dir())
        label = f"{source.repo_id}@{source.revision}"
        if not is_commit(pin.commit):
            raise _lied(label, f"commit {shown(pin.commit)}, which is not a 40-hex commit sha")
        for file in pin.files:
            if (problem := file_name_problem(file.name)) is not None:
                raise _lied(label, f"the file name {shown(file.name)} ({problem})")
            if not is_etag(file.etag):
                raise _lied(label, f"blob id {shown(file.etag)} for {shown(file.name)}")
        folder = None if pin.cached_folder is None else Path(pin.cached_folder)
        if folder is not None and not inside(folder, cache):
            raise _lied(label, f"the cached snapshot {shown(str(folder))}, outside the cache")
        files = tuple(PlannedFile(f.name, f.size, f.etag) for f in pin.files)
        return cls(source, pin.commit, files, cache, cached_folder=folder)

    def watch(self, options: HubOptions) -> Watch:
        """What the hub's answers about this snapshot must agree with (`hub_guard`)."""
        repo = self.source.repo_id
        urls = {
            hf_hub_url(repo, f.name, revision=self.commit, endpoint=options.endpoint): Listed(
                f.name, f.size
            )
            for f in self.files
        }
        return Watch(self.snapshot, self.commit, urls)


@contextmanager
def hub_errors(source: HubSource) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into ours, with what to do next."""
    try:
        yield
    except hf_errors.GatedRepoError as exc:
        raise GatedOrUnauthorized(
            f"{source.repo_id} is gated. Accept its terms on the Hub, then pass a token with "
            "access in the X-HF-Token header (or set HF_TOKEN on the server)."
        ) from exc
    except hf_errors.RepositoryNotFoundError as exc:
        raise _auth_or_missing(source, exc) from exc
    except hf_errors.RevisionNotFoundError as exc:
        raise SourceNotFound(
            f"{source.repo_id} has no revision {source.revision!r}. Check the branch, tag or sha."
        ) from exc
    except hf_errors.LocalEntryNotFoundError as exc:
        if hub_offline():
            raise SourceNotFound(
                f"{source.repo_id}@{source.revision} is not in the local HF cache and the hub "
                "is offline (HF_HUB_OFFLINE). Download it first or allow hub access."
            ) from exc
        raise
    except hf_errors.HfHubHTTPError as exc:
        if _refused(exc):
            raise _auth_or_missing(source, exc) from exc
        raise


@contextmanager
def _metadata(source: HubSource) -> Iterator[None]:
    """Metadata requests (no retry loop of ours): a hub that does not answer fails the
    load `download_failed` with what to check."""
    try:
        with hub_errors(source):
            yield
    except Exception as exc:
        if _permanent(exc):
            raise
        raise DownloadFailed(
            f"The Hub did not answer for {source.repo_id} ({type(exc).__name__}: "
            f"{str(exc)[:200]}). Check the node's access to the Hub (HF_ENDPOINT, proxy), "
            "then load it again."
        ) from exc


def _auth_or_missing(source: HubSource, exc: Exception) -> BaseholdError:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        return GatedOrUnauthorized(
            f"The Hub answered {status} for {source.repo_id}: it is private or gated. Pass a "
            "token with access in the X-HF-Token header (or set HF_TOKEN on the server)."
        )
    if status == 404 or isinstance(exc, hf_errors.RepositoryNotFoundError):
        return SourceNotFound(f"{source.repo_id} was not found on the Hub. Check the repo id.")
    return SourceNotFound(f"Could not fetch {source.repo_id} from the Hub: {type(exc).__name__}.")


# -- metadata -------------------------------------------------------------------------
def plan(source: HubSource, token: str | None, options: HubOptions) -> Plan:
    """Resolve the revision to a commit and list the files a load needs (no file bytes).
    Offline (HF_HUB_OFFLINE), or when the Hub does not answer, a complete cached snapshot
    of the revision is used as it is (huggingface_hub's own fallback)."""
    cache = Path(hub_cache_dir())
    if hub_offline():
        with hub_errors(source):
            folder = _cached_snapshot(source, cache)
        return Plan(source, folder.name, (), cache, cached_folder=folder)
    try:
        return _online_plan(source, token, options, cache)
    except HubAnswerRefused:
        raise  # a hub that lies is not a hub that is down
    except DownloadFailed as exc:
        try:
            folder = _cached_snapshot(source, cache)
        except (hf_errors.LocalEntryNotFoundError, hf_errors.IncompleteSnapshotError):
            raise exc from None
        log.warning(
            "the Hub did not answer for %s (%s); loading the cached snapshot %s",
            source.repo_id,
            exc.message,
            folder.name,
        )
        return Plan(source, folder.name, (), cache, cached_folder=folder)


def _cached_snapshot(source: HubSource, cache: Path) -> Path:
    return Path(
        snapshot_download(
            source.repo_id,
            revision=source.revision,
            cache_dir=cache,
            local_files_only=True,
            ignore_patterns=HUB_IGNORE,
        )
    )


def _online_plan(source: HubSource, token: str | None, options: HubOptions, cache: Path) -> Plan:
    """The commit and its files (sizes, etags) from one repo-info request, bounded by
    huggingface_hub's metadata timeout (the API calls have none of their own: a hub that
    accepts the connection and never answers would hold the POST and the load forever)."""
    api = HfApi(endpoint=options.endpoint, token=token or None)
    with _metadata(source), watching(Watch(f"{source.repo_id}@{source.revision}", None, {})):
        info = api.model_info(
            source.repo_id, revision=source.revision, files_metadata=True, timeout=_timeout()
        )
    plan = _listed_plan(source, info, cache)
    ref = plan.storage / "refs" / source.revision
    try:  # refs/<revision>: what a later load finds when the Hub does not answer
        _confined(ref, plan)
        _cache_commit_hash_for_specific_revision(str(plan.storage), source.revision, plan.commit)
    except OSError as exc:
        log.warning("could not record %s@%s in the cache: %s", source.repo_id, source.revision, exc)
    _record_tree(plan, list(info.siblings or []))
    return plan


def _listed_plan(source: HubSource, info: Any, cache: Path) -> Plan:
    """The plan the repo info lists, each part held to the shape the Hub gives it before
    any of it names a path; files over their kind's cap are refused before any is fetched."""
    label = f"{source.repo_id}@{source.revision}"
    commit = str(info.sha)
    if not is_commit(commit):
        raise _lied(label, f"commit {shown(commit)}, which is not a 40-hex commit sha")
    entries = {}
    for sibling in info.siblings or []:
        name = str(sibling.rfilename)
        if (problem := file_name_problem(name)) is not None:
            raise _lied(
                label,
                f"the file name {shown(name)}, which is not a path inside the repo ({problem})",
            )
        _check_entry(label, name, sibling)
        entries[name] = sibling
    wanted = filter_repo_objects(list(entries), ignore_patterns=HUB_IGNORE)
    files = tuple(
        PlannedFile(name, int(entries[name].size), _etag(entries[name])) for name in wanted
    )
    for file in files:
        cap = size_cap(file.name)
        if cap is not None and file.size > cap:
            raise InvalidCheckpoint(
                f"{source.repo_id}@{commit[:12]}: {file.name} is {file.size} bytes, over the "
                f"{cap >> 20} MiB such a file may have. This is not a checkpoint basehold loads; "
                "check the repo id and revision."
            )
    return Plan(source, commit, files, cache)


def _check_entry(label: str, name: str, sibling: Any) -> None:
    """A listed file's size and blob ids: what it is fetched as, and counted against."""
    size, blob_id, lfs = sibling.size, sibling.blob_id, sibling.lfs
    if not isinstance(size, int) or size < 0 or blob_id is None:
        raise _lied(
            label,
            f"no size or blob id for {shown(name)} (a file listing without them cannot be checked)",
        )
    if not is_etag(str(blob_id)) or len(str(blob_id)) != 40:
        raise _lied(label, f"blob id {shown(str(blob_id))} for {shown(name)}, which is not one")
    if lfs is not None and (
        not is_etag(str(lfs.sha256)) or len(str(lfs.sha256)) != 64 or lfs.size != size
    ):
        raise _lied(
            label,
            f"LFS {shown(str(lfs.sha256))} of {lfs.size} bytes for {shown(name)}, listed at {size}",
        )


def _lied(label: str, what: str) -> HubAnswerRefused:
    return HubAnswerRefused(
        f"For {label}, the hub listed {what}. basehold refused the listing and wrote nothing "
        "from it: the endpoint (BASEHOLD_HF_ENDPOINT or HF_ENDPOINT) does not answer as the "
        "Hugging Face Hub does. Check that mirror or proxy, then load again."
    )


def _confined(path: Path, plan: Plan) -> Path:
    """`path`, if it lies inside the HF cache (what is written is never outside it)."""
    if not inside(path, plan.cache):
        raise HubAnswerRefused(
            f"{plan.snapshot}: {path} is outside the HF cache {plan.cache}; nothing was "
            "written there. Check the HF cache folder (HF_HUB_CACHE) for links out of it."
        )
    return path


def _record_tree(plan: Plan, siblings: list[Any]) -> None:
    """Write the commit's file list into huggingface_hub's tree cache, as `snapshot_download`
    would after listing the tree itself: it then lists nothing (its tree listing has no
    timeout, and on the Hub it is paged). An entry huggingface_hub cannot use is ignored by
    it (format version, Xet hashes: these files keep their HEAD request)."""
    if not siblings:
        return  # an empty repo: snapshot_download lists it (and finds nothing)
    entries = {
        s.rfilename: TreeCacheEntry(
            size=int(s.size),
            blob_id=str(s.blob_id),
            lfs_sha256=s.lfs.sha256 if s.lfs is not None else None,
            lfs_size=s.lfs.size if s.lfs is not None else None,
        )
        for s in siblings
    }
    _confined(plan.storage / "trees" / f"{plan.commit}.json", plan)
    write_tree_cache(str(plan.storage), plan.commit, entries)


def _timeout() -> float:
    """huggingface_hub's metadata timeout, HF_HUB_ETAG_TIMEOUT, read now: a loader takes
    the service's HF_* settings after huggingface_hub was imported in its template."""
    return float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or hub_constants.DEFAULT_ETAG_TIMEOUT)


def _etag(entry: Any) -> str:
    lfs = getattr(entry, "lfs", None)
    return str(lfs.sha256 if lfs is not None else entry.blob_id)


def fetch_config(plan: Plan, token: str | None, options: HubOptions) -> Path:
    """config.json at the plan's commit (into the cache); the folder it sits in."""
    if plan.cached_folder is not None:
        return plan.cached_folder
    listed = next((f for f in plan.files if f.name == "config.json"), None)
    if listed is None:
        raise InvalidCheckpoint(
            f"{plan.snapshot} has no config.json. Check the repo id and revision."
        )
    with _metadata(plan.source), watching(plan.watch(options)):
        path = hf_hub_download(
            plan.source.repo_id,
            "config.json",
            revision=plan.commit,
            token=token or None,
            cache_dir=plan.cache,
            endpoint=options.endpoint,
        )
    folder = plan.storage / "snapshots" / plan.commit
    if not _same(Path(path).parent, folder) or misfits(
        folder, plan.cache, [(listed.name, listed.size)]
    ):
        _remove(plan, folder, listed)
        raise HubAnswerRefused(
            f"{plan.snapshot}: config.json in the HF cache is not the file the hub listed "
            f"({listed.size} bytes); it was removed. Load again."
        )
    return folder


def check_weights(plan: Plan, token: str | None, options: HubOptions) -> None:
    """Read the safetensors headers (ranged requests, huggingface_hub's
    `get_safetensors_metadata`): the weights exist and parse, before they are fetched.
    Nothing to read when every file is cached already (the load checks the local headers)
    or for `.bin` checkpoints."""
    if plan.cached_folder is not None or not plan.missing():
        return
    names = {f.name for f in plan.files}
    api = HfApi(endpoint=options.endpoint, token=token or None)
    try:
        with _metadata(plan.source), watching(plan.watch(options)):
            metadata = api.get_safetensors_metadata(plan.source.repo_id, revision=plan.commit)
    except hf_errors.NotASafetensorsRepoError:
        if any(n.startswith("pytorch_model") and n.endswith(".bin") for n in names):
            return
        raise InvalidCheckpoint(
            f"{plan.source.repo_id}@{plan.commit[:12]} has no weights (*.safetensors or "
            "pytorch_model*.bin). Check the repo id and revision."
        ) from None
    except hf_errors.SafetensorsParsingError as exc:
        raise InvalidCheckpoint(
            f"{plan.source.repo_id}@{plan.commit[:12]}: a safetensors header does not parse "
            f"({exc}). The checkpoint on the Hub is broken; pick another revision."
        ) from exc
    tensors = sum(len(file.tensors) for file in metadata.files_metadata.values())
    log.info(
        "%s@%s: %d tensors in %d safetensors files; %d bytes to fetch",
        plan.source.repo_id,
        plan.commit[:12],
        tensors,
        len(metadata.files_metadata),
        sum(f.size for f in plan.missing()),
    )


def check_disk(plan: Plan) -> None:
    """The files the cache lacks must fit in its free space (partial files count as done),
    checked again as the download starts: admission checked it beside the downloads in
    flight, maybe long before."""
    if needed := plan.download_bytes():
        require_room(plan.cache, needed, plan.snapshot, free_bytes(plan.cache))


# -- download -------------------------------------------------------------------------
def _scan(blobs: Path, etags: Collection[str]) -> tuple[set[str], dict[str, tuple[Path, int]]]:
    """Which of `etags` are complete blobs, and the largest partial file of each other."""
    complete: set[str] = set()
    partial: dict[str, tuple[Path, int]] = {}
    try:
        entries = list(os.scandir(blobs))
    except FileNotFoundError:
        return complete, partial
    for entry in entries:
        if entry.name in etags:
            complete.add(entry.name)
            continue
        match = _PARTIAL.match(entry.name)
        if match is None or match["etag"] not in etags:
            continue
        try:
            size = entry.stat().st_size
        except FileNotFoundError:
            continue  # renamed into place meanwhile
        if size > partial.get(match["etag"], (blobs, -1))[1]:
            partial[match["etag"]] = (Path(entry.path), size)
    return complete, {etag: found for etag, found in partial.items() if etag not in complete}


def partials(plan: Plan) -> dict[str, tuple[Path, int]]:
    """The largest partial file per blob the cache still lacks: etag → (path, bytes)."""
    return _scan(plan.storage / "blobs", {f.etag for f in plan.missing()})[1]


class _Quiet(hf_tqdm):
    """huggingface_hub's bars, never drawn: progress is what `_Watcher` sees on disk."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


class _Watcher:
    """Download progress as bytes on disk: the blobs the cache lacked when the download
    began, complete or partial (huggingface_hub's temporary files grow as bytes arrive,
    over HTTP or Xet alike), summed across files every 0.1 s."""

    def __init__(self, plan: Plan, progress: Progress) -> None:
        self._plan = plan
        self._progress = progress
        self._sizes = {f.etag: f.size for f in plan.missing()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="download-progress", daemon=True)

    @property
    def total(self) -> int:
        return sum(self._sizes.values())

    def on_disk(self) -> int:
        complete, partial = _scan(self._plan.storage / "blobs", self._sizes)
        done = sum(self._sizes[etag] for etag in complete)
        return done + sum(min(size, self._sizes[etag]) for etag, (_, size) in partial.items())

    def __enter__(self) -> _Watcher:
        self._progress.set_total(self.total)
        self._report()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._report()

    def _report(self) -> None:
        done = self.on_disk()
        if done != self._progress.bytes_done:
            self._progress.bytes_done = 0
            self._progress.advance(done)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self._report()


def resume_partials(plan: Plan, token: str | None, options: HubOptions) -> None:
    """Finish what a killed download left (see the module's docstring)."""
    names = {f.etag: f for f in plan.files}
    locks = _confined(plan.cache / ".locks" / plan.storage.name, plan)
    locks.mkdir(parents=True, exist_ok=True)
    for etag, (partial, _) in partials(plan).items():
        file = names[etag]
        blob = _confined(plan.storage / "blobs" / etag, plan)
        with WeakFileLock(locks / f"{etag}.lock"):
            if blob.exists() or not partial.exists():
                continue
            done = partial.stat().st_size
            log.info("resuming %s at %d of %d bytes", file.name, done, file.size)
            url = hf_hub_url(
                plan.source.repo_id, file.name, revision=plan.commit, endpoint=options.endpoint
            )
            meta = get_hf_file_metadata(url, token=token or None, endpoint=options.endpoint)
            location = meta.location
            same_origin = urlsplit(location).netloc == urlsplit(url).netloc
            headers = build_hf_headers(token=(token or None) if same_origin else False)
            with partial.open("r+b") as fh:
                fh.seek(done)
                http_get(
                    location,
                    fh,
                    resume_size=done,
                    headers=headers,
                    expected_size=file.size,
                    tqdm_class=_Quiet,
                )
            os.chmod(partial, 0o644 & ~_umask())
            os.replace(partial, blob)
        for other in blob.parent.glob(f"{etag}.*incomplete"):
            other.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _permanent(exc: BaseException) -> bool:
    """Errors a retry cannot fix: refusals, missing entries, our own errors."""
    refusals = (
        BaseholdError,
        hf_errors.GatedRepoError,
        hf_errors.RepositoryNotFoundError,
        hf_errors.RevisionNotFoundError,
        hf_errors.RemoteEntryNotFoundError,
        hf_errors.NotASafetensorsRepoError,
        hf_errors.SafetensorsParsingError,
    )
    return isinstance(exc, refusals) or _refused(exc)


def _refused(exc: BaseException) -> bool:
    """An HTTP answer that says no (4xx), not "later" (408, 429, 5xx)."""
    if not isinstance(exc, hf_errors.HfHubHTTPError):
        return False
    status = getattr(exc.response, "status_code", None)
    return status is not None and 400 <= status < 500 and status not in (408, 429)


def download(plan: Plan, token: str | None, options: HubOptions, progress: Progress) -> Path:
    """The snapshot folder, downloaded with huggingface_hub (parallel files, its faster
    backends where installed), partial files resumed first. Transient failures (a cut
    connection, 5xx) are retried with exponential backoff, then fail `download_failed`."""
    if plan.cached_folder is not None:
        return plan.cached_folder
    with _Watcher(plan, progress):
        progress.set_phase(Phase.DOWNLOADING)  # with its total and what is already on disk
        return _download(plan, token, options)


class SnapshotMismatch(Exception):
    """Files a download left that are not what the hub listed (removed: a retry fetches
    them again)."""


def _verified(plan: Plan, folder: Path) -> Path:
    """`folder` if it is the plan's snapshot and holds each listed file at its listed size,
    inside the cache (Xet downloads bypass `hub_guard`; a cache can be damaged)."""
    expected = plan.storage / "snapshots" / plan.commit
    if not _same(folder, expected):
        raise HubAnswerRefused(
            f"{plan.snapshot}: the download ended in {folder}, not {expected}. Check the HF "
            "cache folder (HF_HUB_CACHE), then load again."
        )
    names = set(misfits(folder, plan.cache, [(f.name, f.size) for f in plan.files]))
    if names:
        for file in plan.files:
            if file.name in names:
                _remove(plan, folder, file)
        raise SnapshotMismatch(
            f"{', '.join(sorted(shown(n) for n in names))[:300]} in the HF cache are not the "
            "files the hub listed (size, or a link out of the cache); removed to fetch again"
        )
    return folder


def _same(folder: Path, other: Path) -> bool:
    """One folder (huggingface_hub resolves the cache's path, links included)."""
    return os.path.realpath(folder) == os.path.realpath(other)


def _remove(plan: Plan, folder: Path, file: PlannedFile) -> None:
    """A snapshot's file that is not what the hub listed: its link, and its blob if the
    blob (not something it links to elsewhere) is the one in this repo's cache."""
    pointer = folder / file.name
    blob = plan.storage / "blobs" / file.etag
    for path in (pointer, blob):
        if inside(path.parent, plan.cache):
            path.unlink(missing_ok=True)


def _download(plan: Plan, token: str | None, options: HubOptions) -> Path:
    for attempt in range(options.retries + 1):
        try:
            with hub_errors(plan.source), watching(plan.watch(options)):
                resume_partials(plan, token, options)
                folder = snapshot_download(
                    plan.source.repo_id,
                    revision=plan.commit,
                    token=token or None,
                    cache_dir=plan.cache,
                    ignore_patterns=HUB_IGNORE,
                    endpoint=options.endpoint,
                    max_workers=options.workers,
                    tqdm_class=_Quiet,
                )
            return _verified(plan, Path(str(folder)))
        except Exception as exc:
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise InsufficientStorage(
                    f"The disk of the HF cache {plan.cache} filled up while downloading "
                    f"{plan.source.repo_id}. Free space there, or point HF_HUB_CACHE at a "
                    "larger disk; the next load resumes what was fetched."
                ) from exc
            if _permanent(exc):
                raise
            if attempt == options.retries:
                raise DownloadFailed(
                    f"Downloading {plan.source.repo_id}@{plan.commit[:12]} failed "
                    f"{attempt + 1} times ({type(exc).__name__}: {str(exc)[:200]}). The files "
                    "fetched so far stay in the cache and the next load resumes them: check "
                    "the node's access to the Hub (HF_ENDPOINT, proxy), then load it again."
                ) from exc
            delay = options.backoff * 2**attempt
            log.warning(
                "download of %s failed (%s: %s); retry %d of %d in %.1f s",
                plan.source.repo_id,
                type(exc).__name__,
                str(exc)[:200],
                attempt + 1,
                options.retries,
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")

"""The door huggingface_hub's HTTP answers come through in a loader process.

huggingface_hub builds cache paths from response headers inside `hf_hub_download` and
`snapshot_download`: `blobs/<ETag or X-Linked-Etag>`, `snapshots/<X-Repo-Commit>/...` and,
on a 404, `.no_exist/<X-Repo-Commit>/...`. Checking the repo info it returned is not
enough, so its HTTP client (`huggingface_hub.set_client_factory`: its own default client,
with one more event hook each way) refuses, before huggingface_hub reads it, an answer
whose commit is not a 40-hex sha, whose ETag is neither a blob id nor a sha256, or that is
compressed (its size could not be counted); and within a hub operation (`watching`):

- a file's HEAD must state the commit and size the repo listing gave;
- a body may not run past what was listed: a file's own size (less the range start), the
  range asked for, or (repo info, error pages) `API_MAX_BYTES`, counted as it arrives, so a
  hub that claims 1 KB and sends 20 MB is cut off at the first chunk over.

A refusal raises `HubAnswerRefused` (`download_failed`), which huggingface_hub does not
catch: the download stops and its temporary file is removed. Redirects a listed file's
HEAD or GET answers with (to a CDN, or `resolve-cache`) count as that file.

Xet downloads (hf_xet, not this client: bytes this door cannot count) are for the Hub
itself over TLS only: from any other endpoint the HEAD's `X-Xet-Hash` is dropped, and
huggingface_hub fetches the file over HTTP, through here. From the Hub, hf_xet is given the
size checked at the HEAD, and what it leaves is checked against the listing after the
download (`hub_checks.misfits`).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx2
from huggingface_hub import constants as hub_constants
from huggingface_hub import set_client_factory
from huggingface_hub.file_download import _normalize_etag
from huggingface_hub.utils._http import _is_same_or_hub_host, default_client_factory

from service.common.load.hub_checks import HubAnswerRefused, is_commit, is_etag, shown

API_MAX_BYTES = 64 << 20  # repo info of a large repo is a few MB
_XET_HASH = re.compile(r"[0-9a-f]{64}")
# Where Xet downloads are taken from: the Hub, over TLS (scheme, host, port).
XET_ORIGINS = frozenset({("https", "huggingface.co", 443), ("https", "hf.co", 443)})
_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


@dataclass(frozen=True)
class Listed:
    name: str
    size: int


class Watch:
    """What one hub operation expects: the commit (None while it is resolved) and each
    listed file's size by its URL (`hf_hub_url` at that commit)."""

    def __init__(self, label: str, commit: str | None, files: Mapping[str, Listed]) -> None:
        self.label = label
        self.commit = commit
        self._files = {_key(url): listed for url, listed in files.items()}
        self._lock = threading.Lock()
        self.largest = max((listed.size for listed in files.values()), default=0)

    def find(self, url: str) -> Listed | None:
        with self._lock:
            return self._files.get(url)

    def alias(self, url: str, listed: Listed) -> None:
        with self._lock:
            self._files[_key(url)] = listed


_lock = threading.Lock()
_watches: list[Watch] = []
_installed = False


@contextmanager
def watching(watch: Watch) -> Iterator[None]:
    """Hold huggingface_hub's answers to `watch` while the block runs."""
    install()
    with _lock:
        _watches.append(watch)
    try:
        yield
    finally:
        with _lock:
            _watches.remove(watch)


def install() -> None:
    """From now on in this process, huggingface_hub's client is `_client()`."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    set_client_factory(_client)


def _client() -> httpx2.Client:
    client = default_client_factory()
    hooks = client.event_hooks
    client.event_hooks = {
        "request": [*hooks.get("request", []), _on_request],
        "response": [*hooks.get("response", []), _on_response],
    }
    return client


def _on_request(request: httpx2.Request) -> None:
    request.headers["Accept-Encoding"] = "identity"  # bodies counted as they are written


def _on_response(response: httpx2.Response) -> None:
    request = response.request
    url = _key(str(request.url))
    headers = response.headers
    with _lock:
        watches = list(_watches)
    watch, listed = next(
        ((w, found) for w in watches if (found := w.find(url)) is not None), (None, None)
    )
    label = watch.label if watch is not None else (watches[0].label if watches else "")
    _check_headers(response, url, label)
    if _XET_HEADER in headers and _origin(request.url) not in XET_ORIGINS:
        del headers[_XET_HEADER]  # over HTTP instead, every byte counted
    if watch is not None and listed is not None:
        _check_listed(response, watch, listed)
    if not watches or request.method == "HEAD":
        return
    cap, what = _cap(response, listed, max(w.largest for w in watches))
    length = headers.get("Content-Length")
    if length is not None and length.isdigit() and int(length) > cap:
        raise _refused(label, f"{length} bytes for {what}, more than the {cap} it listed")
    if isinstance(response.stream, httpx2.SyncByteStream):
        response.stream = _Capped(response.stream, cap, label, what)


def _check_headers(response: httpx2.Response, url: str, label: str) -> None:
    headers = response.headers
    encoding = headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise _refused(label, f"a {shown(encoding)}-encoded body for {_path(url)} (not asked)")
    commit = headers.get(hub_constants.HUGGINGFACE_HEADER_X_REPO_COMMIT)
    if commit is not None and not is_commit(commit):
        raise _refused(label, f"X-Repo-Commit {shown(commit)}, which is not a commit sha")
    if response.request.method != "HEAD" or not _final(response):
        return
    # What huggingface_hub names the blob after (`get_hf_file_metadata`).
    etag = _normalize_etag(
        headers.get(hub_constants.HUGGINGFACE_HEADER_X_LINKED_ETAG) or headers.get("ETag")
    )
    if etag is not None and not is_etag(etag):
        raise _refused(label, f"ETag {shown(etag)}, which is neither a blob id nor a sha256")
    xet = headers.get(hub_constants.HUGGINGFACE_HEADER_X_XET_HASH)
    if xet is not None and _XET_HASH.fullmatch(xet) is None:
        raise _refused(label, f"X-Xet-Hash {shown(xet)}, which is not a hash")


def _check_listed(response: httpx2.Response, watch: Watch, listed: Listed) -> None:
    headers = response.headers
    commit = headers.get(hub_constants.HUGGINGFACE_HEADER_X_REPO_COMMIT)
    if commit is not None and watch.commit is not None and commit != watch.commit:
        raise _refused(
            watch.label,
            f"X-Repo-Commit {commit[:12]} for {shown(listed.name)}, not the commit it listed",
        )
    if response.request.method == "HEAD" and _final(response) and not response.is_error:
        said = headers.get(hub_constants.HUGGINGFACE_HEADER_X_LINKED_SIZE) or (
            None if response.is_redirect else headers.get("Content-Length")
        )
        if said is not None and said.strip() != str(listed.size):
            raise _refused(
                watch.label,
                f"{shown(said)} bytes for {shown(listed.name)}, not the {listed.size} it listed",
            )
    if response.has_redirect_location:  # the same file, elsewhere (a CDN, resolve-cache)
        watch.alias(urljoin(str(response.request.url), headers["Location"]), listed)


def _final(response: httpx2.Response) -> bool:
    """Whether huggingface_hub reads a HEAD's file metadata from this response: it follows
    redirects on the Hub's own hosts (`resolve-cache`), and stops at others (a CDN)."""
    if not response.has_redirect_location:
        return True
    url = str(response.request.url)
    return not _is_same_or_hub_host(url, urljoin(url, response.headers["Location"]))


def _cap(response: httpx2.Response, listed: Listed | None, largest: int) -> tuple[int, str]:
    """The most body bytes `response` may have, and what it is."""
    what = shown(listed.name) if listed is not None else _path(str(response.request.url))
    start, stop = 0, None
    if response.status_code == 206:
        match = _RANGE.fullmatch(response.request.headers.get("Range", "").strip())
        if match is not None:
            start = int(match[1])
            stop = int(match[2]) + 1 if match[2] else None
    if listed is not None and response.is_success:
        cap = listed.size - start
        return max(0, min(cap, stop - start) if stop is not None else cap), what
    if stop is not None:
        return max(0, stop - start), what
    return max(API_MAX_BYTES, largest), what


class _Capped(httpx2.SyncByteStream):
    """A response body that raises once it runs past `cap` bytes, before the chunk that
    does reaches huggingface_hub."""

    def __init__(self, inner: httpx2.SyncByteStream, cap: int, label: str, what: str) -> None:
        self._inner = inner
        self._cap = cap
        self._label = label
        self._what = what

    def __iter__(self) -> Iterator[bytes]:
        seen = 0
        for chunk in self._inner:
            seen += len(chunk)
            if seen > self._cap:
                raise _refused(
                    self._label, f"more than the {self._cap} bytes it listed for {self._what}"
                )
            yield chunk

    def close(self) -> None:
        self._inner.close()


def _refused(label: str, what: str) -> HubAnswerRefused:
    subject = f"For {label}, the hub" if label else "The hub"
    return HubAnswerRefused(
        f"{subject} sent {what}. basehold refused that answer and kept nothing of it: the "
        "endpoint (BASEHOLD_HF_ENDPOINT or HF_ENDPOINT) does not answer as the Hugging Face "
        "Hub does. Check that mirror or proxy, then load again."
    )


_XET_HEADER = hub_constants.HUGGINGFACE_HEADER_X_XET_HASH


def _origin(url: httpx2.URL) -> tuple[str, str, int]:
    return (url.scheme, url.host, url.port or {"https": 443, "http": 80}.get(url.scheme, 0))


def _key(url: str) -> str:
    return str(httpx2.URL(url))


def _path(url: str) -> str:
    return shown(urlsplit(url).path)

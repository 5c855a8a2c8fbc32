"""A local stand-in for the Hugging Face Hub: the parts of its HTTP API that
`huggingface_hub` uses to find and download a model, served from folders on 127.0.0.1.

- `GET /api/models/{repo}/revision/{rev}`: repo info (`sha` = the commit; with
  `?blobs=true` each sibling's `size`, `blobId` and `lfs`), 401 for private repos without
  their token, 404 `RepoNotFound` / `RevisionNotFound`.
- `GET /api/models/{repo}/tree/{rev}`: the file listing (`oid`, `size`, `lfs`).
- `HEAD|GET /{repo}/resolve/{rev}/{file}`: small files answer 200 with `ETag` (the git blob
  id), `X-Repo-Commit`, `Content-Length`; large files (LFS) answer 302 to `/lfs/{sha256}`
  with `X-Linked-Etag` / `X-Linked-Size`, as the Hub redirects to its CDN. Gated repos
  answer 401 `GatedRepo` without their token.
- `GET /lfs/{sha256}`: the bytes, with `Range` (206).

It can slow down (`rate`, bytes per second per download), fail mid-file (`fail_after`:
close the connection after N bytes of a file, the next `fail_times` whole-file GETs),
answer 503 to whole-file GETs (`unavailable`; ranged reads such as header reads still
work), and counts what it served per file (`served`), so a test sees exactly what was
downloaded.

A repo can also lie, as a mirror or proxy that is not the Hub could (`Lies`): a commit
that is not a sha (`../x`), ETags that are paths, file names that leave the repo, bodies
longer than the sizes it lists (`claimed` sizes are stated in the listing and the HEAD
headers alike; the bytes sent are the file's own, plus `extra`).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".onnx", ".gguf")
CHUNK = 64 * 1024


@dataclass
class HubFile:
    name: str
    path: Path
    size: int
    blob_id: str  # git's sha1 of "blob <size>\0<bytes>"
    sha256: str | None  # set for LFS files

    @property
    def etag(self) -> str:
        return self.sha256 or self.blob_id


@dataclass
class Lies:
    """What this hub says wrong about one repo."""

    commit: str | None = None  # the commit its repo info and X-Repo-Commit headers name
    header_commit: str | None = None  # X-Repo-Commit only (repo info stays true)
    etags: dict[str, str] = field(default_factory=dict)  # file → its HEAD's ETag value
    names: dict[str, str] = field(default_factory=dict)  # file → the name its listing gives
    extra: dict[str, int] = field(default_factory=dict)  # file → spaces sent after its bytes
    no_length: set[str] = field(default_factory=set)  # file → body without Content-Length
    missing: set[str] = field(default_factory=set)  # file → 404 EntryNotFound when fetched
    xet: set[str] = field(default_factory=set)  # LFS file → a HEAD with Xet headers (no CAS)


@dataclass
class HubRepo:
    repo_id: str
    commit: str
    files: dict[str, HubFile]
    branches: dict[str, str]
    gated: bool = False
    private: bool = False
    token: str | None = None
    lies: Lies = field(default_factory=Lies)

    @property
    def said_commit(self) -> str:
        """The commit its headers name."""
        return self.lies.header_commit or self.lies.commit or self.commit


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    status: int


@dataclass
class Faults:
    """What the hub does wrong, changeable while it runs."""

    # Bytes per second per download (whole files and open-ended ranges: not header reads);
    # None: as fast as it can.
    rate: float | None = None
    # Whole-file GETs of `file` are cut after `fail_after[file]` bytes, `fail_times` times.
    fail_after: dict[str, int] = field(default_factory=dict)
    fail_times: dict[str, int] = field(default_factory=dict)
    unavailable: set[str] = field(default_factory=set)  # 503 for whole-file GETs
    # As the Hub may: small files' `resolve` answers 307 to `/api/resolve-cache/...` on the
    # same host (whose headers huggingface_hub does not read: it follows), then the file.
    resolve_cache: bool = False
    # Whole-file GETs of `file` send their headers, then wait until `held[file]` is set
    # (a request held in flight for as long as the test needs; it counts in `streaming`).
    held: dict[str, threading.Event] = field(default_factory=dict)


def _digest(data_path: Path) -> tuple[str, str]:
    sha1 = hashlib.sha1(f"blob {data_path.stat().st_size}\0".encode())
    sha256 = hashlib.sha256()
    with data_path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            sha1.update(chunk)
            sha256.update(chunk)
    return sha1.hexdigest(), sha256.hexdigest()


class LocalHub:
    def __init__(self) -> None:
        self.repos: dict[str, HubRepo] = {}
        self.faults = Faults()
        self.served: Counter[str] = Counter()  # "repo/file" → body bytes sent
        self.requests: list[Request] = []
        self.streaming = 0  # file bodies being sent right now
        self._lock = threading.Lock()
        # The Hub and its "CDN" (LFS bytes): two origins, as huggingface_hub expects.
        self._servers: list[ThreadingHTTPServer] = []

    # -- content -------------------------------------------------------------------
    def add(
        self,
        repo_id: str,
        folder: Path,
        *,
        branches: tuple[str, ...] = ("main",),
        gated: bool = False,
        private: bool = False,
        token: str | None = None,
        claimed: dict[str, int] | None = None,
        lies: Lies | None = None,
    ) -> HubRepo:
        """Serve `folder` as `repo_id`. `claimed`: sizes the listing and the metadata
        headers state instead of the files' own (a repo too big for the disk, or a lie)."""
        files: dict[str, HubFile] = {}
        commit = hashlib.sha1(repo_id.encode())
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            name = path.relative_to(folder).as_posix()
            blob_id, sha256 = _digest(path)
            lfs = name.endswith(LFS_SUFFIXES)
            size = (claimed or {}).get(name, path.stat().st_size)
            files[name] = HubFile(name, path, size, blob_id, sha256 if lfs else None)
            commit.update(f"{name}:{blob_id}".encode())
        sha = commit.hexdigest()
        repo = HubRepo(repo_id, sha, files, dict.fromkeys(branches, sha), gated, private, token)
        repo.lies = lies or Lies()
        self.repos[repo_id] = repo
        return repo

    def bytes_served(self, repo_id: str, name: str | None = None) -> int:
        with self._lock:
            if name is not None:
                return self.served[f"{repo_id}/{name}"]
            return sum(n for key, n in self.served.items() if key.startswith(f"{repo_id}/"))

    def reset_counts(self) -> None:
        with self._lock:
            self.served.clear()
            self.requests.clear()

    # -- server --------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._servers[0].server_address[1]}"

    @property
    def cdn(self) -> str:
        return f"http://127.0.0.1:{self._servers[1].server_address[1]}"

    def start(self) -> LocalHub:
        hub = self

        class Handler(_Handler):
            owner = hub

        for _ in range(2):
            server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
            server.daemon_threads = True
            # Shut down within 10 ms, not the default 0.5 s poll (x2 servers, every test).
            threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
            self._servers.append(server)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers.clear()

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def count(self, key: str, n: int) -> None:
        with self._lock:
            self.served[key] += n

    def streams(self, change: int) -> None:
        with self._lock:
            self.streaming += change

    def take_cut(self, name: str) -> int | None:
        """Bytes to send of `name` before cutting the connection, if a cut is due."""
        with self._lock:
            left = self.faults.fail_times.get(name, 0)
            if left <= 0 or name not in self.faults.fail_after:
                return None
            self.faults.fail_times[name] = left - 1
            return self.faults.fail_after[name]


_API = re.compile(
    r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<kind>revision|tree)/(?P<rev>[^/]+))?$"
)
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_CACHED = re.compile(
    r"^/api/resolve-cache/models/(?P<repo>[^/]+/[^/]+)/(?P<rev>[^/]+)/(?P<file>.+)$"
)
_LFS = re.compile(r"^/lfs/(?P<sha>[0-9a-f]{64})$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    owner: LocalHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        return None

    def do_HEAD(self) -> None:
        self._route(body=False)

    def do_GET(self) -> None:
        self._route(body=True)

    # -- routing -------------------------------------------------------------------
    def _route(self, *, body: bool) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        self.blobs = "blobs=true" in url.query.lower()  # repo info with file metadata
        status = 500
        try:
            if match := _API.match(path):
                kind = match["kind"] or "revision"
                status = self._api(match["repo"], kind, match["rev"] or "main")
            elif match := _RESOLVE.match(path):
                status = self._resolve(match["repo"], match["rev"], match["file"], body=body)
            elif match := _CACHED.match(path):
                status = self._resolve(
                    match["repo"], match["rev"], match["file"], body=body, cached=True
                )
            elif match := _LFS.match(path):
                status = self._lfs(match["sha"], body=body)
            else:
                status = self._error(404, "RepoNotFound", "no such route")
        finally:
            self.owner.record(Request(self.command, path, self.headers.get("Range"), status))

    def _repo(self, repo_id: str, *, files: bool) -> HubRepo | int:
        repo = self.owner.repos.get(repo_id)
        auth = self.headers.get("Authorization", "")
        allowed = repo is not None and (
            not (repo.private or (repo.gated and files)) or auth == f"Bearer {repo.token}"
        )
        if repo is None or (repo.private and not allowed):
            return self._error(401, "RepoNotFound", "Repository not found")
        if not allowed:
            return self._error(
                401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access."
            )
        return repo

    def _at(self, repo_id: str, rev: str, *, files: bool) -> tuple[HubRepo, str] | int:
        """The repo and the commit `rev` names, or the status of the error answered."""
        repo = self._repo(repo_id, files=files)
        if isinstance(repo, int):
            return repo
        if rev == repo.commit:
            return repo, rev
        if rev in repo.branches:
            return repo, repo.branches[rev]
        return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")

    def _api(self, repo_id: str, kind: str, rev: str) -> int:
        found = self._at(repo_id, rev, files=False)
        if isinstance(found, int):
            return found
        repo, commit = found
        payload: Any
        lies = repo.lies
        if kind == "revision":
            payload = {
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "sha": lies.commit or commit,
                "private": repo.private,
                "gated": "manual" if repo.gated else False,
                "siblings": [_sibling(f, lies, blobs=self.blobs) for f in repo.files.values()],
            }
        else:
            payload = [_tree_entry(f, lies) for f in repo.files.values()]
        return self._json(200, payload, {})

    def _resolve(
        self, repo_id: str, rev: str, name: str, *, body: bool, cached: bool = False
    ) -> int:
        found = self._at(repo_id, rev, files=True)
        if isinstance(found, int):
            return found
        repo, commit = found
        file = repo.files.get(name)
        said = repo.said_commit
        if file is None or name in repo.lies.missing:
            return self._error(404, "EntryNotFound", f"{name} does not exist", commit=said)
        etag = repo.lies.etags.get(name)
        headers = {"X-Repo-Commit": said, "ETag": f'"{etag or file.blob_id}"'}
        if file.sha256 is not None:  # LFS: to the "CDN", as the Hub does
            headers |= {
                "X-Linked-Etag": f'"{etag or file.sha256}"',
                "X-Linked-Size": str(file.size),
                "Location": f"{self.owner.cdn}/lfs/{file.sha256}",
                "Content-Length": "0",
            }
            if name in repo.lies.xet:  # huggingface_hub would ask this route for a CAS token
                headers |= {
                    "X-Xet-Hash": file.sha256,
                    "X-Xet-Refresh-Route": f"{self.owner.url}/api/models/{repo_id}/xet-read-token",
                }
            return self._head(302, headers)
        if self.owner.faults.resolve_cache and not cached:
            location = f"/api/resolve-cache/models/{repo_id}/{commit}/{name}"
            headers = {"X-Repo-Commit": said, "ETag": 'W/"not-a-blob-id"', "Location": location}
            return self._head(307, headers | {"Content-Length": "0"})
        return self._send_file(f"{repo_id}/{name}", file, repo.lies, headers, body=body)

    def _lfs(self, sha: str, *, body: bool) -> int:
        for repo in self.owner.repos.values():
            for file in repo.files.values():
                if file.sha256 == sha:
                    key = f"{repo.repo_id}/{file.name}"
                    return self._send_file(key, file, repo.lies, {}, body=body)
        return self._error(404, "EntryNotFound", "no such object")

    # -- bodies ----------------------------------------------------------------------
    def _send_file(
        self, key: str, file: HubFile, lies: Lies, headers: dict[str, str], *, body: bool
    ) -> int:
        wanted = self.headers.get("Range")
        if body and file.name in self.owner.faults.unavailable and not wanted:
            return self._error(503, "", "Service temporarily unavailable")
        content = _Body(file.path, lies.extra.get(file.name, 0))
        size = content.size
        start, stop = 0, size  # [start, stop)
        status, closed = 200, False  # closed: a `bytes=a-b` read (a header read)
        if wanted and (match := _RANGE.match(wanted.strip())):
            start = int(match[1])
            stop = min(size, int(match[2]) + 1) if match[2] else size
            if start >= size:
                return self._head(416, {"Content-Range": f"bytes */{size}", "Content-Length": "0"})
            status, closed = 206, bool(match[2])
            headers = headers | {"Content-Range": f"bytes {start}-{stop - 1}/{size}"}
        # A HEAD states what the hub claims; a GET sends what it has.
        length = stop - start if body or status == 206 else file.size
        headers = headers | {"Accept-Ranges": "bytes", "Content-Length": str(length)}
        if body and file.name in lies.no_length:  # the body runs until the connection closes
            del headers["Content-Length"]
            headers["Connection"] = "close"
            self.close_connection = True
        self._head(status, headers)
        if not body:
            return status
        cut = self.owner.take_cut(file.name) if not wanted else None
        rate = None if closed else self.owner.faults.rate
        gate = None if wanted else self.owner.faults.held.get(file.name)
        self._stream(key, content, (start, stop), cut, rate, gate)
        return status

    def _stream(
        self,
        key: str,
        content: _Body,
        span: tuple[int, int],
        cut: int | None,
        rate: float | None,
        gate: threading.Event | None = None,
    ) -> None:
        self.owner.streams(+1)
        try:
            if gate is not None:
                gate.wait(120)
            self._send_bytes(key, content, span, cut, rate)
        finally:
            self.owner.streams(-1)

    def _send_bytes(
        self, key: str, content: _Body, span: tuple[int, int], cut: int | None, rate: float | None
    ) -> None:
        start, stop = span
        began = time.monotonic()
        sent = 0
        with content.path.open("rb") as fh:
            while start + sent < stop:
                size = min(CHUNK, stop - start - sent)
                if cut is not None:
                    size = min(size, cut - sent)
                    if size <= 0:
                        self.close_connection = True
                        self.wfile.flush()
                        self.connection.close()  # mid-file: the client sees a short body
                        return
                chunk = content.read(fh, start + sent, size)
                try:
                    self.wfile.write(chunk)
                except OSError:
                    return  # the client went away (cancelled, killed)
                sent += len(chunk)
                self.owner.count(key, len(chunk))
                if rate:
                    ahead = sent / rate - (time.monotonic() - began)
                    if ahead > 0:
                        time.sleep(ahead)

    def _error(self, status: int, code: str, message: str, commit: str | None = None) -> int:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        if commit is not None:
            headers["X-Repo-Commit"] = commit
        return self._json(status, {"error": message}, headers)

    def _json(self, status: int, payload: Any, headers: dict[str, str]) -> int:
        data = json.dumps(payload).encode()
        headers = headers | {"Content-Type": "application/json", "Content-Length": str(len(data))}
        self._head(status, headers)
        if self.command != "HEAD":
            self.wfile.write(data)
        return status

    def _head(self, status: int, headers: dict[str, str]) -> int:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        return status


@dataclass(frozen=True)
class _Body:
    """A file's bytes, then `extra` spaces (a body longer than the size listed)."""

    path: Path
    extra: int

    @property
    def size(self) -> int:
        return self.path.stat().st_size + self.extra

    def read(self, fh: Any, offset: int, size: int) -> bytes:
        own = self.path.stat().st_size
        data = b""
        if offset < own:
            fh.seek(offset)
            data = fh.read(min(size, own - offset))
        return data + b" " * (size - len(data))


def _sibling(file: HubFile, lies: Lies, *, blobs: bool) -> dict[str, Any]:
    sibling: dict[str, Any] = {"rfilename": lies.names.get(file.name, file.name)}
    if blobs:
        sibling |= {"size": file.size, "blobId": file.blob_id}
        if file.sha256 is not None:
            sibling["lfs"] = {"sha256": file.sha256, "size": file.size, "pointerSize": 134}
    return sibling


def _tree_entry(file: HubFile, lies: Lies) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": "file", "oid": file.blob_id, "size": file.size}
    entry["path"] = lies.names.get(file.name, file.name)
    if file.sha256 is not None:
        entry["lfs"] = {"oid": file.sha256, "size": file.size, "pointerSize": 134}
    return entry

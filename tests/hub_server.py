"""A small Hugging Face Hub look-alike on 127.0.0.1, for tests and benchmarks (HF_ENDPOINT points at it).

It serves the endpoints huggingface_hub uses to read a model repository:
- GET /api/models/{repo}[/revision/{rev}][?blobs=true]: the commit hash and the files (size, blob id, LFS sha256);
- HEAD and GET /{repo}/resolve/{rev}/{file}, with Range (206 + Content-Range), ETag, X-Repo-Commit,
  X-Linked-Size and X-Linked-Etag; *.safetensors files are LFS files (their ETag is their sha256).
Errors answer as the Hub does (X-Error-Code: RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo).

It counts the body bytes it sends (per repo/file), logs every request, can cap its bandwidth, require a token, and
inject faults: `server.faults` holds dicts, each applied to the requests it matches (see Fault kinds below).
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

CHUNK = 2**20


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**22):
            digest.update(chunk)
    return digest.hexdigest()


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer:
    """Repositories are folders; each push makes a new commit and moves `main` to it (old commits stay served).

    Fault kinds (dicts in `faults`; `times`: how many matching requests it applies to, default forever; "repo" and
    "file" restrict it to one repository or file name):
    - {"kind": "status", "code": 500, "target": "resolve"|"api", "file": name}: answer with that status;
    - {"kind": "drop", "file": name, "at": offset}: a GET whose range covers byte `at` sends the bytes before it,
      then the connection is closed;
    - {"kind": "corrupt", "file": name, "at": offset}: byte `at` is flipped in every GET covering it;
    - {"kind": "call", "file": name, "min_start": offset, "fn": f}: f() is called before serving a GET of
      `file` whose range starts at or after min_start (e.g. to push a new commit mid-run).
    """

    def __init__(self, rate: float | None = None):
        self.repos: dict[str, dict] = {}
        self.faults: list[dict] = []
        self.token: str | None = None  # when set, every request must carry it
        self.gated: set[str] = set()
        self.rate = rate  # bytes per second for all responses together, None: unlimited
        self.sent: dict[str, int] = {}  # "repo/file": body bytes sent
        self.requests: list[tuple[str, str, str | None]] = []
        self.lock = threading.Lock()
        self._free_at = 0.0
        self._server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ repositories
    def push(self, repo_id: str, folder: Path) -> str:
        """Publish every file of folder as a new commit of repo_id (on main); returns the commit hash."""
        files = {}
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            name = path.relative_to(folder).as_posix()
            lfs = name.endswith(".safetensors")
            record = {"path": path, "size": path.stat().st_size}
            if lfs:
                record["sha256"] = _sha256(path)
                record["etag"] = record["sha256"]
                record["blob_id"] = hashlib.sha1(record["sha256"].encode()).hexdigest()
            else:
                record["blob_id"] = record["etag"] = _git_blob_id(path.read_bytes())
            files[name] = record
        listing = json.dumps({n: r.get("sha256", r["blob_id"]) for n, r in files.items()}, sort_keys=True)
        repo = self.repos.setdefault(repo_id, {"commits": {}, "refs": {}})
        commit = hashlib.sha1(f"{repo_id}:{len(repo['commits'])}:{listing}".encode()).hexdigest()
        repo["commits"][commit] = files
        repo["refs"]["main"] = commit
        return commit

    def sent_total(self, suffix: str = "") -> int:
        """Body bytes sent for files whose name ends with suffix (e.g. ".safetensors")."""
        with self.lock:
            return sum(n for key, n in self.sent.items() if key.endswith(suffix))

    def reset_counts(self) -> None:
        with self.lock:
            self.sent.clear()
            self.requests.clear()

    # ------------------------------------------------------------------ serving
    def start(self) -> str:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True, name="hub-server").start()
        return self.url

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def _fault(self, target: str, repo: str, file: str | None, start: int | None = None, end: int | None = None):
        """The first fault that applies to this request (its `times` counted down), or None."""
        with self.lock:
            for fault in self.faults:
                if fault.get("times", 1) <= 0 or fault.get("target", "resolve") != target:
                    continue
                if fault.get("file") not in (None, file) or fault.get("repo") not in (None, repo):
                    continue
                kind = fault["kind"]
                if kind in ("drop", "corrupt") and not (start is not None and start <= fault["at"] < end):
                    continue
                if kind == "call" and (start is None or start < fault.get("min_start", 0)):
                    continue
                if "times" in fault:
                    fault["times"] -= 1
                return fault
        return None

    def _throttle(self, n: int) -> None:
        if not self.rate:
            return
        with self.lock:
            now = time.monotonic()
            self._free_at = max(self._free_at, now) + n / self.rate
            wait = self._free_at - now
        time.sleep(wait)


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def handle(self):
        try:
            super().handle()
        except (ConnectionResetError, BrokenPipeError):  # the client went away: nothing to answer
            pass

    def do_HEAD(self):
        self._handle(head=True)

    def do_GET(self):
        self._handle(head=False)

    def _handle(self, head: bool):
        hub = self.hub
        url = urlparse(self.path)
        path = unquote(url.path)
        with hub.lock:
            hub.requests.append((self.command, path, self.headers.get("Range")))
        if hub.token and self.headers.get("Authorization") != f"Bearer {hub.token}":
            return self._error(401, "RepoNotFound", "Invalid username or password.")
        api = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path)
        if api:
            return self._api(api.group(1), api.group(2) or "main", head)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if resolve:
            return self._resolve(*resolve.groups(), head=head)
        return self._error(404, None, "Not Found")

    def _repo(self, repo_id: str, revision: str):
        """(commit, files) or None after answering the error."""
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(401, "RepoNotFound", "Repository not found")
            return None
        if repo_id in self.hub.gated and not self.headers.get("Authorization"):
            self._error(401, "GatedRepo", "Access to this model is restricted")
            return None
        commit = repo["refs"].get(revision, revision)
        if commit not in repo["commits"]:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return commit, repo["commits"][commit]

    def _api(self, repo_id: str, revision: str, head: bool):
        fault = self.hub._fault("api", repo_id, None)
        if fault and fault["kind"] == "status":
            return self._error(fault["code"], None, "injected")
        found = self._repo(repo_id, revision)
        if found is None:
            return
        commit, files = found
        siblings = []
        for name, record in files.items():
            sibling = {"rfilename": name, "size": record["size"], "blobId": record["blob_id"]}
            if "sha256" in record:
                sibling["lfs"] = {"sha256": record["sha256"], "size": record["size"], "pointerSize": 134}
            siblings.append(sibling)
        body = json.dumps({"id": repo_id, "modelId": repo_id, "sha": commit, "private": False, "siblings": siblings})
        self._send(200, {"Content-Type": "application/json", "X-Repo-Commit": commit}, body.encode(), head, None)

    def _resolve(self, repo_id: str, revision: str, name: str, head: bool):
        hub = self.hub
        found = self._repo(repo_id, revision)
        if found is None:
            return
        commit, files = found
        record = files.get(name)
        if record is None:
            return self._error(404, "EntryNotFound", f"{name} does not exist at {commit}")
        size = record["size"]
        start, end = 0, size
        ranged = self.headers.get("Range")
        if ranged:
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", ranged.strip())
            if not match or int(match.group(1)) >= max(size, 1):
                return self._error(416, None, "Range Not Satisfiable")
            start = int(match.group(1))
            end = min(size, int(match.group(2)) + 1) if match.group(2) else size
        fault = None if head else hub._fault("resolve", repo_id, name, start, end)
        if fault and fault["kind"] == "status":
            return self._error(fault["code"], None, "injected")
        if fault and fault["kind"] == "call":
            fault["fn"]()
            fault = None
        headers = {
            "ETag": f'"{record["etag"]}"',
            "X-Repo-Commit": commit,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if "sha256" in record:
            headers.update({"X-Linked-Size": str(size), "X-Linked-Etag": f'"{record["sha256"]}"'})
        if ranged:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        self.send_response(206 if ranged else 200)
        for key, value in {**headers, "Content-Length": str(end - start)}.items():
            self.send_header(key, value)
        self.end_headers()
        if head:
            return
        stop = fault["at"] if fault and fault["kind"] == "drop" else end
        with open(record["path"], "rb") as f:
            f.seek(start)
            position = start
            while position < stop:
                chunk = bytearray(f.read(min(CHUNK, stop - position)))
                if fault and fault["kind"] == "corrupt" and position <= fault["at"] < position + len(chunk):
                    chunk[fault["at"] - position] ^= 0xFF
                hub._throttle(len(chunk))
                try:
                    self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True
                    return
                with hub.lock:
                    key = f"{repo_id}/{name}"
                    hub.sent[key] = hub.sent.get(key, 0) + len(chunk)
                position += len(chunk)
        if stop < end:  # drop: the connection goes away mid-body
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True

    def _error(self, code: int, error_code: str | None, message: str):
        body = json.dumps({"error": message}).encode()
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if error_code:
            headers["X-Error-Code"] = error_code
        self._send(code, headers, body, self.command == "HEAD", None)

    def _send(self, code: int, headers: dict, body: bytes, head: bool, name: str | None):
        self.send_response(code)
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

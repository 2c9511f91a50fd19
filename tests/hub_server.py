"""A real HTTP server on 127.0.0.1 that speaks the Hugging Face Hub's file API, for download tests.

Endpoints (the ones huggingface_hub's ``snapshot_download`` and ``hf_hub_download`` use):
``GET /api/models/{repo}[/revision/{rev}]`` (model info), ``GET /api/models/{repo}/tree/{rev}``
(file listing) and ``HEAD|GET /{repo}/resolve/{rev}/{path}`` (file metadata and bytes, with
``X-Repo-Commit``, ``ETag``, ``X-Linked-Etag`` / ``X-Linked-Size`` for LFS files, and ranges).
Errors carry the Hub's ``X-Error-Code`` header (RepoNotFound, RevisionNotFound, EntryNotFound).
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit


class LocalServer:
    """An HTTP server on a free port of 127.0.0.1 in a daemon thread; ``handler`` builds the request
    handler class from the server object. Use ``start()``/``stop()`` or ``with``."""

    def __init__(self, handler) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class FakeHub(LocalServer):
    """Repositories held in memory; ``commit()`` adds a revision; ``requests`` logs what was asked."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        super().__init__(_handler)

    def commit(self, repo_id: str, files: dict[str, bytes], *, tag: str | None = None) -> str:
        """Add a commit holding exactly ``files`` on ``main`` (and ``tag``); returns its 40-hex id."""
        repo = self.repos.setdefault(repo_id, Repo())
        sha = hashlib.sha1(f"{repo_id}:{len(repo.commits)}".encode()).hexdigest()
        repo.commits[sha] = dict(files)
        repo.refs["main"] = sha
        if tag:
            repo.refs[tag] = sha
        return sha

    def downloads(self, filename: str) -> int:
        """How many times the bytes of ``filename`` were sent (GET on resolve)."""
        return sum(1 for method, path in self.requests if method == "GET" and "/resolve/" in path and path.endswith("/" + filename))


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        # -------------------------------------------------------------- helpers
        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, str(value))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head and body:
                self.wfile.write(body)

        def _error(self, status: int, code: str, message: str, head: bool = False) -> None:
            body = json.dumps({"error": message}).encode()
            headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
            self._send(status, body, headers, head)

        def _json(self, payload) -> None:
            self._send(200, json.dumps(payload).encode(), {"Content-Type": "application/json"})

        def _split_repo(self, parts: list[str]) -> tuple[str, list[str]]:
            return "/".join(parts[:2]), parts[2:]

        def _commit(self, repo_id: str, revision: str, head: bool = False):
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head)
                return None, None
            sha = repo.refs.get(revision, revision if revision in repo.commits else None)
            if sha is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
                return None, None
            return sha, repo.commits[sha]

        # -------------------------------------------------------------- routes
        def do_HEAD(self) -> None:
            self._route(head=True)

        def do_GET(self) -> None:
            self._route(head=False)

        def _route(self, head: bool) -> None:
            path = urlsplit(self.path).path
            hub.requests.append(("HEAD" if head else "GET", path))
            parts = [unquote(p) for p in path.strip("/").split("/")]
            if parts[:2] == ["api", "models"]:
                repo_id, rest = self._split_repo(parts[2:])
                if not rest or rest[0] == "revision":
                    self._model_info(repo_id, rest[1] if len(rest) > 1 else "main")
                elif rest[0] == "tree":
                    self._tree(repo_id, rest[1] if len(rest) > 1 else "main")
                else:
                    self._error(404, "EntryNotFound", "unknown API route")
                return
            repo_id, rest = self._split_repo(parts)
            if len(rest) >= 3 and rest[0] == "resolve":
                self._resolve(repo_id, rest[1], "/".join(rest[2:]), head)
            else:
                self._error(404, "EntryNotFound", "unknown route", head)

        def _model_info(self, repo_id: str, revision: str) -> None:
            sha, files = self._commit(repo_id, revision)
            if sha is not None:
                self._json({"id": repo_id, "modelId": repo_id, "sha": sha, "private": False, "tags": [],
                            "siblings": [{"rfilename": name} for name in sorted(files)]})

        def _tree(self, repo_id: str, revision: str) -> None:
            sha, files = self._commit(repo_id, revision)
            if sha is None:
                return
            entries = []
            for name, data in sorted(files.items()):
                entry = {"type": "file", "oid": git_blob_id(data), "size": len(data), "path": name}
                if name.endswith(LFS_SUFFIXES):
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                entries.append(entry)
            self._json(entries)

        def _resolve(self, repo_id: str, revision: str, filename: str, head: bool) -> None:
            sha, files = self._commit(repo_id, revision, head)
            if sha is None:
                return
            if filename not in files:
                self._error(404, "EntryNotFound", f"{filename} not found", head)
                return
            data = files[filename]
            headers = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
            if filename.endswith(LFS_SUFFIXES):
                digest = hashlib.sha256(data).hexdigest()
                headers.update({"ETag": f'"{digest}"', "X-Linked-Etag": f'"{digest}"', "X-Linked-Size": len(data)})
            else:
                headers["ETag"] = f'"{git_blob_id(data)}"'
            status, body = 200, data
            ranged = self.headers.get("Range")
            if ranged and ranged.startswith("bytes=") and not head:
                first, _, last = ranged[len("bytes="):].partition("-")
                start, end = int(first or 0), int(last) if last else len(data) - 1
                status, body = 206, data[start : end + 1]
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            if head:
                self.send_response(200)
                for key, value in headers.items():
                    self.send_header(key, str(value))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                return
            self._send(status, body, headers)

    return Handler

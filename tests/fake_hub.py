"""A small stand-in for the Hugging Face Hub, for tests: the endpoints huggingface_hub calls.

The real Hub cannot be reached from the test machines, so the real client
(``snapshot_download``, ``HfApi.create_repo`` / ``upload_folder``) is pointed at this
server with ``HF_ENDPOINT``. It speaks what huggingface_hub 2.4 asks for:

- ``GET /api/models/OWNER/NAME[/revision/REV]``: the repository's info (its commit ``sha``);
- ``GET /api/models/OWNER/NAME/tree/REV``: the file listing (path, size, git blob ``oid``);
- ``HEAD`` / ``GET /OWNER/NAME/resolve/REV/PATH``: a file, with ``X-Repo-Commit`` and ``ETag``;
- ``POST /api/models/OWNER/NAME/branch/BRANCH``: a branch, from ``main``;
- ``POST /api/repos/create``, ``/api/validate-yaml``, ``/api/models/OWNER/NAME/preupload/REV``
  (every file "regular", i.e. sent inside the commit) and ``/api/models/OWNER/NAME/commit/REV``
  (the NDJSON commit: a header line, then one line per file, base64).

Errors carry the ``X-Error-Code`` header the client turns into its exception types.

A hostile Hub is this one with ``tamper`` set: the commit sha its info gives, the ETag
or ``X-Repo-Commit`` of its files, the paths of its listing, or a stall before answering.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


def git_blob_id(data: bytes) -> str:
    """The id git (and so the Hub) gives a file's content: sha1 of 'blob SIZE\\0' + content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    private: bool
    commits: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)  # (sha, files), oldest first
    refs: dict[str, str] = field(default_factory=dict)  # branch -> sha

    def files_at(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        sha = self.refs.get(revision, revision)
        for commit_sha, files in self.commits:
            if commit_sha == sha:
                return commit_sha, files
        return None


class FakeHub:
    """Serve repositories on 127.0.0.1 in a thread; ``url`` is what HF_ENDPOINT is set to."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for assertions
        self.created: list[dict] = []  # the payloads of /api/repos/create
        # What a hostile Hub answers instead: "sha" (info), "etag" / "commit" (file headers),
        # "extra_path" (one more listing entry), "stall" (seconds before every answer).
        self.tamper: dict[str, object] = {}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                hub._handle(self, "HEAD")

            def do_GET(self) -> None:
                hub._handle(self, "GET")

            def do_POST(self) -> None:
                hub._handle(self, "POST")

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a client that gave up on a stalled answer: nothing to report

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- repositories ------------------------------------------------------------------------
    def commit(self, repo_id: str, files: dict[str, bytes], branch: str = "main", private: bool = False) -> str:
        """Add a commit of ``files`` (the whole tree) on ``branch``; its sha."""
        repo = self.repos.setdefault(repo_id, Repo(private=private))
        sha = hashlib.sha1(repr((repo_id, len(repo.commits), sorted(files.items()))).encode()).hexdigest()
        repo.commits.append((sha, dict(files)))
        repo.refs[branch] = sha
        return sha

    def publish_folder(self, repo_id: str, folder: Path, branch: str = "main") -> str:
        return self.commit(repo_id, {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}, branch)

    # -- the protocol --------------------------------------------------------------------------
    def _send(self, h: BaseHTTPRequestHandler, status: int, body: bytes = b"", headers: dict | None = None, head=False) -> None:
        h.send_response(status)
        for key, value in (headers or {}).items():
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _json(self, h: BaseHTTPRequestHandler, value: object, status: int = 200) -> None:
        self._send(h, status, json.dumps(value).encode(), {"Content-Type": "application/json"})

    def _error(self, h: BaseHTTPRequestHandler, status: int, code: str, message: str, head: bool = False) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(h, status, body, {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message}, head)

    def _body(self, h: BaseHTTPRequestHandler) -> bytes:
        return h.rfile.read(int(h.headers.get("Content-Length") or 0))

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        path = unquote(urlparse(h.path).path)
        self.requests.append((method, path))
        if stall := self.tamper.get("stall"):
            time.sleep(float(stall))  # type: ignore[arg-type]
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path):
            return self._info(h, m.group(1), m.group(2) or "main")
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path):
            return self._tree(h, m.group(1), m.group(2))
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            return self._resolve(h, m.group(1), m.group(2), m.group(3), head=method == "HEAD")
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/branch/(.+)", path):
            return self._branch(h, m.group(1), m.group(2))
        if path == "/api/repos/create" and method == "POST":
            return self._create(h, json.loads(self._body(h)))
        if path == "/api/validate-yaml" and method == "POST":
            self._body(h)
            return self._json(h, {"errors": [], "warnings": []})
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/(.+)", path):
            files = json.loads(self._body(h))["files"]
            return self._json(h, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/(.+)", path):
            return self._commit(h, m.group(1), m.group(2))
        return self._error(h, 404, "EntryNotFound", f"no route {method} {path}", head=method == "HEAD")

    def _find(self, h: BaseHTTPRequestHandler, repo_id: str, revision: str, head: bool = False):
        repo = self.repos.get(repo_id)
        if repo is None or repo.private and not h.headers.get("Authorization"):
            self._error(h, 404, "RepoNotFound", "Repository not found", head)
            return None
        found = repo.files_at(revision)
        if found is None:
            self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
        return found

    def _info(self, h: BaseHTTPRequestHandler, repo_id: str, revision: str) -> None:
        if found := self._find(h, repo_id, revision):
            sha, files = found
            self._json(
                h,
                {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": self.tamper.get("sha", sha),
                    "private": self.repos[repo_id].private,
                    "siblings": [{"rfilename": name} for name in sorted(files)],
                },
            )

    def _tree(self, h: BaseHTTPRequestHandler, repo_id: str, revision: str) -> None:
        if found := self._find(h, repo_id, revision):
            _, files = found
            listing = [{"type": "file", "path": n, "size": len(d), "oid": git_blob_id(d)} for n, d in sorted(files.items())]
            if extra := self.tamper.get("extra_path"):
                listing.append({"type": "file", "path": extra, "size": 1, "oid": git_blob_id(b"x")})
            self._json(h, listing)

    def _resolve(self, h: BaseHTTPRequestHandler, repo_id: str, revision: str, name: str, head: bool) -> None:
        found = self._find(h, repo_id, revision, head)
        if not found:
            return
        sha, files = found
        if name not in files:
            return self._error(h, 404, "EntryNotFound", f"{name} does not exist", head)
        data = files[name]
        headers = {
            "X-Repo-Commit": str(self.tamper.get("commit", sha)),
            "ETag": str(self.tamper.get("etag", f'"{git_blob_id(data)}"')),
            "Content-Type": "application/octet-stream",
        }
        self._send(h, 200, data, headers, head)

    def _create(self, h: BaseHTTPRequestHandler, payload: dict) -> None:
        self.created.append(payload)
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        if repo_id in self.repos:  # as the Hub answers it: the error, and the repository's URL
            body = {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
            return self._send(
                h, 409, json.dumps(body).encode(), {"Content-Type": "application/json", "X-Error-Code": "RepoExists"}
            )
        self.repos[repo_id] = Repo(private=payload.get("visibility") == "private" or bool(payload.get("private")))
        self._json(h, {"url": f"{self.url}/{repo_id}", "name": repo_id})

    def _branch(self, h: BaseHTTPRequestHandler, repo_id: str, branch: str) -> None:
        self._body(h)
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(h, 404, "RepoNotFound", "Repository not found")
        if "main" in repo.refs:
            repo.refs.setdefault(branch, repo.refs["main"])
        self._json(h, {})

    def _commit(self, h: BaseHTTPRequestHandler, repo_id: str, revision: str) -> None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(h, 404, "RepoNotFound", "Repository not found")
        current = repo.files_at(revision)
        files = dict(current[1]) if current else {}
        for line in self._body(h).splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                value = item["value"]
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "deletedFile":
                files.pop(item["value"]["path"], None)
        sha = self.commit(repo_id, files, revision, repo.private)
        self._json(h, {"commitUrl": f"{self.url}/{repo_id}/commit/{sha}", "commitOid": sha, "success": True})

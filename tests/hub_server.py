"""A small, strict Hub-compatible HTTP server on 127.0.0.1 for offline push/load tests.

It implements only the endpoints that huggingface_hub 2.4 and transformers 5 call to create a repo, create a branch,
commit files (every file is declared "regular", so bytes travel base64 inside the commit and no LFS/Xet server is
needed), read model info and download files (hf-ecosystem-notes §5.5). Any other request is answered 501 and
recorded in ``unknown_requests`` so a test can fail loudly on new client behaviour. ``inject_fault`` makes the next
matching request(s) answer an error status, to test failures in the middle of an upload.

Storage: ``repos[repo_id].branches[name] -> commit sha``; ``repos[repo_id].commits[sha] -> {path: bytes}``.
"""

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

EMPTY_COMMIT = "0" * 40


@dataclass
class FakeRepo:
    branches: dict[str, str] = field(default_factory=lambda: {"main": EMPTY_COMMIT})
    commits: dict[str, dict[str, bytes]] = field(default_factory=lambda: {EMPTY_COMMIT: {}})
    private: bool = False

    def resolve(self, revision: str) -> str | None:
        """Branch name or commit sha -> commit sha (None when unknown)."""
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None

    def files(self, revision: str = "main") -> dict[str, bytes]:
        return self.commits[self.resolve(revision)]


@dataclass
class Fault:
    method: str
    path_pattern: str
    status: int
    message: str
    remaining: int


class FakeHub:
    """``with FakeHub() as hub: hub.endpoint`` -> ``http://127.0.0.1:PORT``; ``hub.requests`` logs (method, path)."""

    def __init__(self, token: str = "hf_fake_token"):
        self.token = token
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[tuple[str, str]] = []
        self.unknown_requests: list[tuple[str, str]] = []
        self.server_errors: list[str] = []
        self.faults: list[Fault] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def inject_fault(self, method: str, path_pattern: str, status: int, message: str = "injected fault",
                     times: int = 1):
        """The next ``times`` requests whose method matches and whose path matches the regex answer ``status``."""
        with self._lock:
            self.faults.append(Fault(method, path_pattern, status, message, times))

    def take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.remaining > 0 and fault.method == method and re.search(fault.path_pattern, path):
                    fault.remaining -= 1
                    return fault
        return None

    def commit(self, repo_id: str, branch: str, payload: list[dict]) -> str:
        """Apply an ndjson commit payload to ``branch``; returns the new commit sha."""
        repo = self.repos[repo_id]
        files = dict(repo.files(branch))
        for item in payload:
            key, value = item["key"], item.get("value", {})
            if key == "header":
                continue
            if key == "file":
                if value.get("encoding") != "base64":
                    raise ValueError(f"unsupported file encoding {value.get('encoding')!r}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: b for p, b in files.items() if not p.startswith(prefix)}
            else:  # "lfsFile" cannot happen: preupload declares every file regular
                raise ValueError(f"unsupported commit operation {key!r}")
        digest = hashlib.sha1(repr((repo.branches[branch], sorted(files.items()))).encode()).hexdigest()
        with self._lock:
            repo.commits[digest] = files
            repo.branches[branch] = digest
        return digest


def _make_handler(hub: FakeHub):
    repo_path = r"(?P<repo>[\w.-]+/[\w.-]+)"

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep pytest output clean
            pass

        # ---------------------------------------------------------------- plumbing
        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
                  content_type: str = "application/json"):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, obj, headers: dict | None = None):
            self._send(status, json.dumps(obj).encode(), headers)

        def _error(self, status: int, message: str, code: str | None = None):
            self._json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message} if code
                       else {"X-Error-Message": message})

        def _authorized(self) -> bool:
            if self.headers.get("Authorization") != f"Bearer {hub.token}":
                self._error(401, "Invalid credentials in Authorization header")
                return False
            return True

        def _repo(self, repo_id: str) -> FakeRepo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, f"Repository {repo_id} not found", "RepoNotFound")
            return repo

        def _dispatch(self):
            path = urlsplit(self.path).path
            query = parse_qs(urlsplit(self.path).query)
            body = self._body() if self.command == "POST" else b""
            hub.requests.append((self.command, path))
            fault = hub.take_fault(self.command, path)
            if fault is not None:
                return self._error(fault.status, fault.message)
            for method, pattern, handler in ROUTES:
                match = re.fullmatch(pattern, path)
                if method == self.command and match:
                    groups = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    try:
                        return handler(self, body=body, query=query, **groups)
                    except Exception as err:  # a bug in the fake itself: answer, and let the test see it
                        hub.server_errors.append(f"{self.command} {self.path}: {err!r}")
                        return self._error(500, f"fake hub crashed: {err!r}")
            hub.unknown_requests.append((self.command, self.path))
            self._error(501, f"fake hub: unsupported endpoint {self.command} {self.path}")

        do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

        # ---------------------------------------------------------------- endpoints
        def create_repo(self, body, query):
            if not self._authorized():
                return
            request = json.loads(body)
            if request.get("type", "model") != "model":
                return self._error(400, f"fake hub only stores model repos, got {request.get('type')!r}")
            repo_id = f"{request['organization']}/{request['name']}" if request.get("organization") \
                else f"user/{request['name']}"
            url = {"url": f"{hub.endpoint}/{repo_id}"}
            if repo_id in hub.repos:
                return self._json(409, {"error": "You already created this model repo", **url})
            hub.repos[repo_id] = FakeRepo(private=request.get("visibility") == "private" or
                                          bool(request.get("private")))
            self._json(200, url)

        def create_branch(self, body, query, repo, branch):
            if not self._authorized() or (fake := self._repo(repo)) is None:
                return
            if branch in fake.branches:
                return self._error(409, f"Branch {branch} already exists")
            start = json.loads(body or b"{}").get("startingPoint", "main")
            sha = fake.resolve(start)
            if sha is None:
                return self._error(404, f"Revision {start} not found", "RevisionNotFound")
            fake.branches[branch] = sha
            self._json(200, {})

        def validate_yaml(self, body, query):
            content = json.loads(body)["content"]
            match = re.match(r"^---\n(.*?)\n---", content, re.S)
            try:
                yaml.safe_load(match.group(1) if match else "")
            except yaml.YAMLError as err:
                return self._json(400, {"errors": [{"message": str(err)}], "warnings": []})
            self._json(200, {"errors": [], "warnings": []})

        def preupload(self, body, query, repo, revision):
            if not self._authorized() or (fake := self._repo(repo)) is None:
                return
            if "create_pr" in query:
                return self._error(400, "fake hub does not implement pull requests")
            if revision not in fake.branches:
                return self._error(404, f"Revision {revision} not found", "RevisionNotFound")
            files = json.loads(body)["files"]
            self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                        "oid": None} for f in files]})

        def commit(self, body, query, repo, revision):
            if not self._authorized() or (fake := self._repo(repo)) is None:
                return
            if revision not in fake.branches:
                return self._error(404, f"Revision {revision} not found", "RevisionNotFound")
            payload = [json.loads(line) for line in body.splitlines() if line.strip()]
            try:
                sha = hub.commit(repo, revision, payload)
            except ValueError as err:
                return self._error(400, str(err))
            self._json(200, {"commitUrl": f"{hub.endpoint}/{repo}/commit/{sha}", "commitOid": sha})

        def model_info(self, body, query, repo, revision="main"):
            if (fake := self._repo(repo)) is None:
                return
            sha = fake.resolve(revision)
            if sha is None:
                return self._error(404, f"Revision {revision} not found", "RevisionNotFound")
            self._json(200, {"id": repo, "modelId": repo, "sha": sha, "private": fake.private,
                             "siblings": [{"rfilename": p} for p in sorted(fake.commits[sha])]})

        def resolve(self, body, query, repo, revision, filename):
            if (fake := self._repo(repo)) is None:
                return
            sha = fake.resolve(revision)
            if sha is None:
                return self._error(404, f"Revision {revision} not found", "RevisionNotFound")
            content = fake.commits[sha].get(filename)
            if content is None:
                return self._error(404, f"Entry {filename} not found at {revision}", "EntryNotFound")
            etag = f'"{hashlib.sha256(content).hexdigest()}"'
            self._send(200, content, {"X-Repo-Commit": sha, "ETag": etag}, "application/octet-stream")

        def tree(self, body, query, repo, revision, folder=""):
            if (fake := self._repo(repo)) is None:
                return
            sha = fake.resolve(revision)
            if sha is None:
                return self._error(404, f"Revision {revision} not found", "RevisionNotFound")
            prefix = folder.strip("/") + "/" if folder.strip("/") else ""
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            entries, folders = [], set()
            for path, content in sorted(fake.commits[sha].items()):
                if not path.startswith(prefix):
                    continue
                parts = path[len(prefix):].split("/")
                for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                    folders.add(prefix + "/".join(parts[:depth]))
                if recursive or len(parts) == 1:
                    entries.append({"type": "file", "path": path, "size": len(content),
                                    "oid": hashlib.sha1(content).hexdigest()})
            entries += [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0}
                        for f in sorted(folders)]
            self._json(200, entries)

    ROUTES = [
        ("POST", r"/api/repos/create", Handler.create_repo),
        ("POST", r"/api/validate-yaml", Handler.validate_yaml),
        ("POST", rf"/api/models/{repo_path}/branch/(?P<branch>[^/]+)", Handler.create_branch),
        ("POST", rf"/api/models/{repo_path}/preupload/(?P<revision>[^/]+)", Handler.preupload),
        ("POST", rf"/api/models/{repo_path}/commit/(?P<revision>[^/]+)", Handler.commit),
        ("GET", rf"/api/models/{repo_path}", Handler.model_info),
        ("GET", rf"/api/models/{repo_path}/revision/(?P<revision>[^/]+)", Handler.model_info),
        ("GET", rf"/api/models/{repo_path}/tree/(?P<revision>[^/]+)(?:/(?P<folder>.*))?", Handler.tree),
        ("HEAD", rf"/{repo_path}/resolve/(?P<revision>[^/]+)/(?P<filename>.+)", Handler.resolve),
        ("GET", rf"/{repo_path}/resolve/(?P<revision>[^/]+)/(?P<filename>.+)", Handler.resolve),
    ]
    return Handler

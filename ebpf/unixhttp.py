"""HTTP over unix sockets: the transport between the SDK, the sandbox runtime and the node agent.

A unix socket (mode 0600) keeps the API off every network, and the kernel tells the server who is
calling (SO_PEERCRED: pid, uid, gid), which a TCP port could not.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import socket
import socketserver
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from pydantic import BaseModel, ValidationError

from agentkube.ebpf.models import MAX_REQUEST_BYTES


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def peer_credentials(sock: socket.socket) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return Peer(*struct.unpack("3i", raw))


# A route gets the peer, the path's parameters and the parsed JSON body, and returns (status, body):
# a pydantic model, a dict, or text (for /metrics).
Route = Callable[[Peer, dict[str, str], object], tuple[int, object]]


def validation_message(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "body"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


class _Handler(BaseHTTPRequestHandler):
    server: UnixHttpServer
    protocol_version = "HTTP/1.1"
    # Answers are whole bodies (nothing here streams): the status line, headers and body are buffered and
    # sent in one write when the request is done (BaseHTTPRequestHandler flushes then), not in two that wake
    # the caller twice.
    wbufsize = 64 * 1024

    def handle_expect_100(self) -> bool:
        # A "100 Continue" must reach the client before it sends the body it is holding back.
        answer = super().handle_expect_100()
        self.wfile.flush()
        return answer

    def log_message(self, format, *args):  # the agent keeps its own audit log
        pass

    def setup(self) -> None:
        super().setup()
        self.server.connections.add(self.connection)

    def finish(self) -> None:
        self.server.connections.discard(self.connection)
        super().finish()

    def handle(self) -> None:
        # A connection that opens with the frames' magic speaks frames (the runtime's calls); else HTTP.
        frames = self.server.frames
        if frames:
            from agentkube.ebpf.frames import MAGIC, MAGIC_WITH_DESCRIPTORS, serve_connection

            try:
                start = self.connection.recv(len(MAGIC), socket.MSG_PEEK)
            except OSError:
                return
            if start in (MAGIC, MAGIC_WITH_DESCRIPTORS):
                self.connection.recv(len(MAGIC))
                serve_connection(self.connection, peer_credentials(self.connection), frames,
                                 descriptors=start == MAGIC_WITH_DESCRIPTORS)
                self.close_connection = True
                return
        super().handle()

    def _respond(self, status: int, body: object) -> None:
        if isinstance(body, BaseModel):
            payload, kind = body.model_dump_json().encode(), "application/json"
        elif isinstance(body, (bytes, str)):
            payload = body.encode() if isinstance(body, str) else body
            kind = "text/plain; version=0.0.4; charset=utf-8"
        else:
            payload, kind = json.dumps(body).encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _upgrade_to_frames(self) -> bool:
        """Serve frames on this connection if it asks to (agentkube.ebpf.frames, its module doc): a 101, then
        frames until the connection closes."""
        from agentkube.ebpf.frames import UPGRADE_PATH, UPGRADE_PROTOCOL, serve_connection

        if not self.server.frames or self.path != UPGRADE_PATH or self.headers.get("Upgrade") != UPGRADE_PROTOCOL:
            return False
        self.send_response(101)
        self.send_header("Connection", "Upgrade")
        self.send_header("Upgrade", UPGRADE_PROTOCOL)
        self.end_headers()
        self.wfile.flush()
        serve_connection(self.connection, peer_credentials(self.connection), self.server.frames)
        self.close_connection = True
        return True

    def _dispatch(self, method: str) -> None:
        if method == "GET" and self._upgrade_to_frames():
            return
        try:
            peer = peer_credentials(self.request)
            route, params = self.server.match(method, self.path.split("?", 1)[0])
            length = self.headers.get("Content-Length")
            if self.headers.get("Transfer-Encoding"):
                raise HttpError(411, "send a Content-Length (chunked bodies are not accepted)")
            size = int(length) if length and length.isdigit() else 0
            if size > MAX_REQUEST_BYTES:
                self.close_connection = True  # the body is not read
                raise HttpError(413, f"request body of {size} bytes is over the {MAX_REQUEST_BYTES} byte limit")
            raw = self.rfile.read(size) if size else b""
            try:
                body = json.loads(raw) if raw else None
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise HttpError(400, f"body is not JSON: {error}") from None
            status, result = route(peer, params, body)
        except HttpError as error:
            status, result = error.status, {"error": error.message}
        except ValidationError as error:
            status, result = 422, {"error": validation_message(error)}
        except Exception as error:  # the server keeps serving; the caller learns what broke
            status, result = 500, {"error": f"{type(error).__name__}: {error}"}
        self._respond(status, result)

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_DELETE(self):
        self._dispatch("DELETE")


class UnixHttpServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """A threaded HTTP server on a unix socket, created with mode 0600 (owner only) unless told otherwise:
    a socket open to everyone must authorize each request by its peer's credentials."""

    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, path: Path, routes: dict[tuple[str, str], Route], mode: int = 0o600,
                 frames: dict | None = None):
        self.routes = routes
        self.frames = frames  # operations served to connections that speak frames (agentkube.ebpf.frames)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700 if mode == 0o600 else 0o755)
        path.unlink(missing_ok=True)
        # The umask gives the socket its mode from the moment it exists, not after a chmod.
        old = os.umask(0o777 & ~mode)
        try:
            super().__init__(str(path), _Handler)
        finally:
            os.umask(old)
        self.path = path
        self.connections: set[socket.socket] = set()  # kept-alive client connections, closed on stop
        self._thread: threading.Thread | None = None

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        parts = [p for p in path.split("/") if p]
        path_known = False
        for (route_method, pattern), route in self.routes.items():
            pattern_parts = [p for p in pattern.split("/") if p]
            if len(pattern_parts) != len(parts):
                continue
            params = {}
            for want, got in zip(pattern_parts, parts, strict=True):
                if want.startswith("{"):
                    params[want.strip("{}")] = got
                elif want != got:
                    break
            else:
                if route_method == method:
                    return route, params
                path_known = True
        if path_known:
            raise HttpError(405, f"{method} is not allowed on {path}")
        raise HttpError(404, f"no such endpoint: {method} {path}")

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name=f"http:{self.path.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        for connection in list(self.connections):
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.path.unlink(missing_ok=True)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float, check_server: Callable[[Peer], None] | None = None):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path
        self.check_server = check_server

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)
        if self.check_server is not None:
            self.check_server(peer_credentials(self.sock))


class ApiError(RuntimeError):
    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


def _exchange(connection: http.client.HTTPConnection, method: str, path: str, body: object) -> object:
    payload = None
    headers = {}
    if body is not None:
        payload = body.model_dump_json().encode() if isinstance(body, BaseModel) else json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    connection.request(method, path, body=payload, headers=headers)
    response = connection.getresponse()
    data = response.read()
    kind = response.getheader("Content-Type", "")
    parsed = json.loads(data) if kind.startswith("application/json") and data else data.decode()
    if response.status >= 400:
        message = parsed.get("error", str(parsed)) if isinstance(parsed, dict) else str(parsed)
        raise ApiError(response.status, message)
    return parsed


def request(socket_path: Path | str, method: str, path: str, body: object = None, timeout: float = 30.0,
            check_server: Callable[[Peer], None] | None = None) -> object:
    """One request on a new connection; returns the parsed JSON (or text) body, raises ApiError on 4xx/5xx.
    `check_server` vets the process listening on the socket before anything is sent to it."""
    connection = _UnixConnection(str(socket_path), timeout, check_server)
    try:
        return _exchange(connection, method, path, body)
    finally:
        connection.close()


class Client:
    """Requests over a kept-alive connection per thread: a tool call makes two requests to the node agent,
    and a new connection (and a new server thread) for each is a measurable part of a short call."""

    def __init__(self, socket_path: Path | str, timeout: float = 30.0, check_server: Callable[[Peer], None] | None = None):
        self.socket_path = str(socket_path)
        self.timeout = timeout
        self.check_server = check_server  # vets the server of each new connection, as request() does
        self._local = threading.local()

    def _connection(self) -> _UnixConnection:
        connection = getattr(self._local, "connection", None)
        if connection is not None and connection.sock is not None:
            # A kept-alive connection that is readable between requests has been closed by the server
            # (e.g. a restarted node agent): use a new one rather than fail the request on it.
            readable, _, _ = select.select([connection.sock], [], [], 0)
            if not readable:
                return connection
            connection.close()
        connection = self._local.connection = _UnixConnection(self.socket_path, self.timeout, self.check_server)
        return connection

    def request(self, method: str, path: str, body: object = None, timeout: float | None = None) -> object:
        """One request on this thread's kept-alive connection (`timeout`: for this request, else the client's)."""
        connection = self._connection()
        connection.timeout = self.timeout if timeout is None else timeout
        if connection.sock is not None:
            connection.sock.settimeout(connection.timeout)
        try:
            return _exchange(connection, method, path, body)
        except (OSError, http.client.HTTPException):
            connection.close()
            self._local.connection = None
            raise

"""Framed requests between the sandbox runtime and the node agent: one frame per direction on a kept-alive
unix-socket connection, on the agent's own socket beside its HTTP API.

HTTP costs a tool call two request parsers, header sets and a response builder on each side; a frame is a
magic prefix (on a connection's first frame only, which is how the agent tells it from HTTP), a 4-byte
length and a JSON object. A request is {"op": NAME, ...}; an answer is {"status": CODE, "body": ...} or
{"status": CODE, "error": MESSAGE}, with HTTP's status codes so both transports report alike.

Who is calling is known once per connection (SO_PEERCRED at accept): a connection belongs to the process
that opened it, since the runtime's sockets are close-on-exec and the runtime is not dumpable.

On a connection opened with MAGIC_WITH_DESCRIPTORS (the warm pool's own), a request may carry one file
descriptor (SCM_RIGHTS, with its frame's first bytes): the runtime hands the agent the release pipe of a held
process with its fill, so that the agent releases it at the call's start. The operation takes it from its
memo (`take_received_fd`) for that frame only; one it does not take is closed. Other connections (a call's
start and finish) read their frames without room for one (the kernel drops any sent), which costs less.

The SDK speaks frames to a sandbox runtime's socket too, but opens its connections with an HTTP upgrade
(`GET /v1/frames`, `Upgrade: agentkube-frames`, answered `101`) rather than the magic prefix: a runtime of an
older release answers that request with a 404 at once and the SDK goes on in HTTP, where a magic prefix would
leave its HTTP parser waiting for the end of a request line that never comes.
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ValidationError

from agentkube.ebpf.models import MAX_REQUEST_BYTES
from agentkube.ebpf.unixhttp import ApiError, HttpError, Peer, peer_credentials, validation_message

MAGIC = b"AKF1"  # no HTTP method starts with it
MAGIC_WITH_DESCRIPTORS = b"AKFD"  # the same, and its requests may carry a descriptor
HEADER = struct.Struct("!I")
MAX_ANSWER_BYTES = 16 * 1024 * 1024
RECEIVED_FD = object()  # the memo's key for the descriptor sent with the frame being served (no JSON names it)
UPGRADE_PATH, UPGRADE_PROTOCOL = "/v1/frames", "agentkube-frames"
UPGRADE_REQUEST = (f"GET {UPGRADE_PATH} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n"
                   f"Upgrade: {UPGRADE_PROTOCOL}\r\n\r\n").encode()
MAX_UPGRADE_ANSWER_BYTES = 4096


def encode(message: object) -> bytes:
    payload = message.model_dump_json().encode() if isinstance(message, BaseModel) else json.dumps(message).encode()
    return HEADER.pack(len(payload)) + payload


def _read_exactly(sock: socket.socket, size: int) -> bytes | None:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            if data:
                raise ConnectionResetError("connection closed in the middle of a frame")
            return None
        data += chunk
    return bytes(data)


def _read_header(sock: socket.socket, received: list[int]) -> bytes | None:
    """A frame's header and the descriptor sent with it, if any (appended to `received`). Room is made for
    one: the kernel drops any more, and any sent with a later part of a frame (read without room for it)."""
    data, fds, _flags, _address = socket.recv_fds(sock, HEADER.size, 1, socket.MSG_CMSG_CLOEXEC)
    received.extend(fds)
    if not data:
        return None
    if len(data) < HEADER.size:
        rest = _read_exactly(sock, HEADER.size - len(data))
        if rest is None:
            raise ConnectionResetError("connection closed in the middle of a frame")
        data += rest
    return data


def read_frame(sock: socket.socket, limit: int, received: list[int] | None = None) -> object | None:
    """The next frame's JSON, None at a clean end of the connection. Raises HttpError for a frame that is
    too large or not JSON (the connection is then closed: its framing can no longer be trusted). With
    `received`, a descriptor sent with the frame is appended to it."""
    header = _read_header(sock, received) if received is not None else _read_exactly(sock, HEADER.size)
    if header is None:
        return None
    (size,) = HEADER.unpack(header)
    if size > limit:
        raise HttpError(413, f"frame of {size} bytes is over the {limit} byte limit")
    payload = _read_exactly(sock, size)
    if payload is None:
        raise ConnectionResetError("connection closed in the middle of a frame")
    try:
        return json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise HttpError(400, f"frame is not JSON: {error}") from None


# An operation gets the connection's peer, its per-connection memo (for what was checked about the peer
# once) and the request, and returns the answer's body, or an `Answered` for work to do after it is sent.
Operation = Callable[[Peer, dict, dict], object]


class Answered:
    """An operation's answer and what is left to do once it has been sent: the caller waits for the answer
    only, and the connection's next frame is read once `after` has run (so a client that asks again on the
    same connection sees that work done). `after` runs whether or not the answer could be sent."""

    def __init__(self, body: object, after: Callable[[], None]):
        self.body, self.after = body, after


def encode_answer(body: object) -> bytes:
    """A 200 answer's frame; a model's body is serialized by pydantic once, straight into the frame."""
    if isinstance(body, BaseModel):
        payload = b'{"status":200,"body":' + body.model_dump_json().encode() + b"}"
        return HEADER.pack(len(payload)) + payload
    return encode({"status": 200, "body": body})


def serve_connection(sock: socket.socket, peer: Peer, operations: dict[str, Operation],
                     descriptors: bool = False) -> None:
    """Answer frames on an accepted connection until it closes (its magic prefix already read); with
    `descriptors`, a frame may carry one (module doc)."""
    memo: dict = {}
    while True:
        received: list[int] = []
        try:
            message = read_frame(sock, MAX_REQUEST_BYTES, received if descriptors else None)
        except HttpError as error:
            _close_all(received)
            sock.sendall(encode({"status": error.status, "error": error.message}))
            return
        except OSError:
            _close_all(received)
            return
        if message is None:
            _close_all(received)
            return
        if received:
            memo[RECEIVED_FD] = received[0]
        after: Callable[[], None] | None = None
        try:
            if not isinstance(message, dict) or not isinstance(message.get("op"), str):
                raise HttpError(400, "expected a JSON object with an op")
            operation = operations.get(message["op"])
            if operation is None:
                raise HttpError(404, f"no such operation: {message['op']}")
            body = operation(peer, memo, message)
            if isinstance(body, Answered):
                after = body.after
                body = body.body
            answer = encode_answer(body)
        except HttpError as error:
            answer = encode({"status": error.status, "error": error.message})
        except ValidationError as error:
            answer = encode({"status": 422, "error": validation_message(error)})
        except Exception as error:  # the agent keeps serving; the caller learns what broke
            answer = encode({"status": 500, "error": f"{type(error).__name__}: {error}"})
        finally:
            untaken = memo.pop(RECEIVED_FD, None)
            _close_all([untaken] if untaken is not None else [])
        try:
            sock.sendall(answer)
        except OSError:
            return
        finally:
            if after is not None:
                try:
                    after()
                except Exception as error:  # the answer is out; the connection keeps serving
                    print(f"node agent: after an answer: {type(error).__name__}: {error}", flush=True)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def take_received_fd(memo: dict) -> int | None:
    """The descriptor sent with the frame being served, now the caller's to close (None: none was sent)."""
    return memo.pop(RECEIVED_FD, None)


class FramesRefused(Exception):
    """The server answered the upgrade to frames with something else (a release without frames on that
    socket): nothing but the upgrade request was sent."""


def _upgrade(sock: socket.socket) -> None:
    """Ask for frames on a new connection (module doc); FramesRefused unless the answer is a 101. The server
    sends nothing after its 101 until asked, so reading to the end of its head reads nothing of a frame."""
    sock.sendall(UPGRADE_REQUEST)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(MAX_UPGRADE_ANSWER_BYTES - len(head))
        if not chunk:
            raise ConnectionResetError("the connection closed before the upgrade was answered")
        if len(head) + len(chunk) >= MAX_UPGRADE_ANSWER_BYTES:
            raise FramesRefused("an over-long answer to the upgrade")
        head += chunk
    status_line = head.split(b"\r\n", 1)[0]
    if status_line.split(b" ", 2)[1:2] != [b"101"] or head.index(b"\r\n\r\n") + 4 != len(head):
        raise FramesRefused(f"the upgrade was answered {status_line.decode('latin-1')!r}")


class FrameClient:
    """Frames over kept-alive connections, shared by the threads that use this client: an idle connection is
    taken for a request and put back after it. (The runtime serves each SDK request in a thread of its own; a
    connection per thread would be a new connection, and a new agent thread, per call.)"""

    def __init__(self, socket_path: Path | str, timeout: float = 30.0, descriptors: bool = False, *,
                 upgrade: bool = False, check_server: Callable[[Peer], None] | None = None,
                 server_name: str = "the node agent"):
        """`descriptors`: its connections may send a descriptor with a frame (`send`). `upgrade`: connections
        open with the HTTP upgrade instead of the magic prefix (a runtime's socket; module doc).
        `check_server` vets the process serving each new connection before anything is sent to it."""
        self.socket_path = str(socket_path)
        self.timeout = timeout
        self.magic = MAGIC_WITH_DESCRIPTORS if descriptors else MAGIC
        self.upgrade, self.check_server, self.server_name = upgrade, check_server, server_name
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # close-on-exec, as Python's sockets are
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
            if self.check_server is not None:
                self.check_server(peer_credentials(sock))
            if self.upgrade:
                _upgrade(sock)
            else:
                sock.sendall(self.magic)
        except BaseException:
            sock.close()
            raise
        return sock

    def _take_idle(self) -> socket.socket | None:
        # An idle connection with something to read has been closed by the agent (a restarted agent): the
        # request goes on another rather than failing on it.
        while True:
            with self._lock:
                if not self._idle:
                    return None
                sock = self._idle.pop()
            if not select.select([sock], [], [], 0)[0]:
                return sock
            sock.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()

    def request(self, op: str, **fields: object) -> object:
        """One request and its answer's body (see send)."""
        return self.send(op, fields)

    def send(self, op: str, fields: dict[str, object], send_fd: int | None = None,
             timeout: float | None = None) -> object:
        """One request and its answer's body; ApiError for a refusal. A connection that breaks (a restarting
        agent) raises ConnectionError and is dropped; the next request opens a new one. `send_fd` goes with
        the frame (the agent gets its own copy of the descriptor). `timeout`: for this request, else the
        client's."""
        if send_fd is not None and self.magic != MAGIC_WITH_DESCRIPTORS:
            raise ValueError("this client's connections carry no descriptors")
        sock = self._take_idle() or self._connect()
        try:
            sock.settimeout(self.timeout if timeout is None else timeout)
            frame = encode({"op": op, **fields})
            if send_fd is not None:
                sent = socket.send_fds(sock, [frame], [send_fd])
                sock.sendall(frame[sent:])
            else:
                sock.sendall(frame)
            answer = read_frame(sock, MAX_ANSWER_BYTES)
            if not isinstance(answer, dict) or "status" not in answer:
                raise ConnectionResetError(f"{self.server_name} closed the connection" if answer is None
                                           else f"{self.server_name} sent a malformed answer")
        except BaseException as error:
            sock.close()
            if isinstance(error, (ConnectionError, KeyboardInterrupt, SystemExit)):
                raise
            if isinstance(error, (OSError, HttpError)):
                raise ConnectionResetError(f"the connection to {self.server_name} failed: {error}") from None
            raise
        with self._lock:
            self._idle.append(sock)
        if answer["status"] >= 400:
            raise ApiError(answer["status"], str(answer.get("error", "")))
        return answer.get("body")

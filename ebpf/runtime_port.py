"""The sandbox runtime's TCP port, through which the gateway (and nothing else) runs commands.

The unix socket stays the node-local path; this port exists only when the operator gave the runtime a
verifier of the sandbox's runtime token (contract.RUNTIME_VERIFIER_ENV). Three things keep everyone but
the gateway out, each on its own:

- the sandbox's NetworkPolicy admits only the gateway's pods to the port;
- every request must carry the sandbox's runtime token, which only the gateway can derive (the runtime
  holds its SHA-256, which a tool call may read: it forges nothing);
- a connection from the pod itself (loopback, or the pod's own address) is refused: a tool call may never
  get a command run through its runtime.

    POST /v1/run   RunRequest → application/x-ndjson, one event per line, as the call produces them:
                   {"stream": "stdout"|"stderr", "data": text} … then {"result": RunResult}
                   (or {"error": message} if the call could not be finished). A refusal before the call
                   runs (a 422 from the node agent, a bad request) is a plain JSON error with its status.
    GET /v1/proof?nonce=N  → {"proof": …}: the runtime proves itself to the gateway before it is sent a
                   token or a command (contract.runtime_proof); asked without a token
    /v1/processes…  background processes (ebpf/processes.py; routes in `_processes`)
    /v1/files?path= workspace files, streamed both ways (ebpf/workspace.py; routes in `_files`)

Why HTTP/1.1 chunked NDJSON: one request per call, readable by any HTTP client line by line, with no
framing library in the sandbox image (the standard library's server speaks it), and the status code still
says whether the call was placed before a byte of output flows.
"""

from __future__ import annotations

import codecs
import ipaddress
import json
import logging
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import parse_qs, urlsplit

from pydantic import BaseModel, ValidationError

from agentkube.contract import RUNTIME_PROOF_PATH, is_proof_nonce, runtime_proof, token_matches
from agentkube.ebpf.models import (
    MAX_PROCESS_OUTPUT_BYTES,
    MAX_REQUEST_BYTES,
    ProcessList,
    RunRequest,
    SandboxRef,
    SignalRequest,
    StdinWrite,
    StdinWritten,
)
from agentkube.ebpf.processes import ProcessTable
from agentkube.ebpf.unixhttp import ApiError, validation_message
from agentkube.ebpf.workspace import CHUNK_BYTES, Workspace, upload_mode

if TYPE_CHECKING:
    from agentkube.ebpf.runtime import Started, WarmPool

Model = TypeVar("Model", bound=BaseModel)


def number(query: dict[str, str], name: str, default: float, most: float | None = None) -> float:
    """A non-negative number from the query string (at most `most`), or a 422."""
    text = query.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ApiError(422, f"{name}: expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise ApiError(422, f"{name}: expected a number of at least 0, got {text!r}")
    return min(value, most) if most is not None else value

logger = logging.getLogger(__name__)

NDJSON = "application/x-ndjson"
RUNTIME_IDLE_SECONDS = 60.0
# Set to "request" on refusals of what a request asks (a path out of the workspace: 403), so that the
# gateway tells them from the runtime refusing the gateway itself (401, 403 from inside the pod).
REFUSAL_HEADER = "X-Agentkube-Refusal"


def from_inside_the_pod(peer: str, local: str) -> bool:
    """Whether a TCP peer is this pod itself: a loopback address, or the pod's own address (the one the
    connection came in on), which only processes in the pod's network namespace can send from."""
    address = ipaddress.ip_address(peer.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_loopback or str(address) == local.split("%", 1)[0].removeprefix("::ffff:")


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


class _Handler(BaseHTTPRequestHandler):
    server: RuntimePortServer
    protocol_version = "HTTP/1.1"
    # The answer goes out in small writes (headers once placed, then a chunk per event): with Nagle's
    # algorithm each one after the first would wait for the gateway's (delayed) acknowledgement.
    disable_nagle_algorithm = True
    # A kept-alive connection idle this long is let go (the gateway drops its end well before): no thread
    # waits forever on a gateway that went away. Also bounds each write to a gateway that stopped reading.
    timeout = RUNTIME_IDLE_SECONDS

    def log_message(self, format, *args):  # requests carry tokens in headers: nothing of them is logged
        pass

    def _json(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _refuse(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self.close_connection = True
        self._json(status, {"error": message}, headers)

    def _allowed(self) -> bool:
        """Every request, whatever it asks: from outside the pod, with the sandbox's runtime token."""
        if from_inside_the_pod(self.client_address[0], self.connection.getsockname()[0]):
            self._refuse(403, "a process inside this sandbox may not run commands through its runtime")
            return False
        token = bearer_token(self.headers.get("Authorization"))
        if token is None or not token_matches(token, self.server.verifier):
            self._refuse(401, "this port serves the agentkube gateway only: no valid runtime token")
            return False
        return True

    def _length(self, most: int) -> int | None:
        length = self.headers.get("Content-Length", "")
        if not length.isdigit() or int(length) > most:
            self._refuse(413 if length.isdigit() else 411, f"send a Content-Length of at most {most} bytes")
            return None
        return int(length)

    def _body(self, model: type[Model]) -> Model | None:
        length = self._length(MAX_REQUEST_BYTES)
        if length is None:
            return None
        try:
            return model.model_validate_json(self.rfile.read(length) or b"{}")
        except ValidationError as error:
            self._refuse(422, validation_message(error))
            return None

    def _prove(self, method: str, query: str) -> None:
        """The runtime proves itself before the gateway sends it anything (contract.runtime_proof): asked
        without a token, since the gateway sends none to a listener that has not proved itself yet."""
        if from_inside_the_pod(self.client_address[0], self.connection.getsockname()[0]):
            return self._refuse(403, "a process inside this sandbox may not run commands through its runtime")
        nonce = (parse_qs(query).get("nonce") or [""])[-1]
        if method != "GET" or not is_proof_nonce(nonce):
            return self._refuse(400, f"GET {RUNTIME_PROOF_PATH}?nonce=<64 hex digits>")
        sandbox = self.server.sandbox
        self._json(200, {"proof": runtime_proof(self.server.verifier, nonce, sandbox.namespace, sandbox.name)})

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        if url.path == RUNTIME_PROOF_PATH:
            return self._prove(method, url.query)
        if not self._allowed():
            return
        query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        try:
            if method == "POST" and url.path == "/v1/run":
                run = self._body(RunRequest)
                if run is not None:
                    self._run(run)
            elif url.path == "/v1/processes" or url.path.startswith("/v1/processes/"):
                self._processes(method, url.path.split("/")[3:], query)
            elif url.path == "/v1/files":
                self._files(method, query)
            else:
                self._refuse(404, f"no such endpoint: {method} {url.path}")
        except ApiError as error:
            self._refuse(error.status, error.message, {REFUSAL_HEADER: "request"})

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _answer(self, model: Model, status: int = 200) -> None:
        self._json(status, json.loads(model.model_dump_json()))

    def _processes(self, method: str, parts: list[str], query: dict[str, str]) -> None:
        """Background processes (ebpf/processes.py):
            POST /v1/processes                  RunRequest → ProcessInfo (201, once placed)
            GET  /v1/processes                  → ProcessList
            GET  /v1/processes/ID?wait=S        → ProcessInfo (held up to S s while it runs)
            GET  /v1/processes/ID/output?stdout=N&stderr=M&wait=S&limit=B → ProcessOutput
            POST /v1/processes/ID/stdin         StdinWrite → StdinWritten
            POST /v1/processes/ID/signal        SignalRequest → ProcessInfo"""
        table = self.server.processes
        if not parts:
            if method == "POST":
                run = self._body(RunRequest)
                if run is not None:
                    self._answer(table.start(run), 201)
            elif method == "GET":
                self._answer(ProcessList(processes=table.list()))
            else:
                self._refuse(405, f"{method} /v1/processes: use GET or POST")
            return
        process, action = table.get(parts[0]), parts[1:]
        wait = number(query, "wait", 0.0)
        if method == "GET" and not action:
            process.wait_until(lambda: process.done, wait)
            self._answer(process.info())
        elif method == "GET" and action == ["output"]:
            self._answer(process.read(int(number(query, "stdout", 0)), int(number(query, "stderr", 0)), wait,
                                      int(number(query, "limit", MAX_PROCESS_OUTPUT_BYTES, MAX_PROCESS_OUTPUT_BYTES))))
        elif method == "POST" and action == ["stdin"]:
            write = self._body(StdinWrite)
            if write is not None:
                self._answer(StdinWritten(written=process.write(write.data.encode(), write.close)))
        elif method == "POST" and action == ["signal"]:
            sent = self._body(SignalRequest)
            if sent is not None:
                process.signal(sent.signal)
                self._answer(process.info())
        else:
            self._refuse(404, f"no such endpoint: {method} {self.path.split('?', 1)[0]}")

    def _files(self, method: str, query: dict[str, str]) -> None:
        """Files in the workspace (ebpf/workspace.py), the path in the query:
            PUT    /v1/files?path=P&mode=755    the body, streamed to disk → FileEntry (201)
            GET    /v1/files?path=P             the file's bytes, streamed (sendfile)
            GET    /v1/files?path=D&list=1      → FileList
            DELETE /v1/files?path=P&recursive=1"""
        workspace, path = self.server.workspace, query.get("path", "")
        if workspace is None:
            raise ApiError(501, "this sandbox's runtime has no workspace to serve")
        if method == "PUT":
            mode = upload_mode(query.get("mode"))
            length = self._length(workspace.max_file_bytes)
            if length is not None:
                chunks = self._chunks(length)
                try:
                    self._answer(workspace.write(path, length, chunks, mode), 201)
                except ApiError as error:
                    if error.status != 413:  # clients send the whole body before they read an answer: take it
                        for _ in chunks:
                            pass
                    raise
        elif method == "GET" and query.get("list") in ("1", "true"):
            self._answer(workspace.list(path or "."))
        elif method == "GET":
            with workspace.read(path) as (fd, size):
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(size))
                self.end_headers()
                self.wfile.flush()
                # The kernel copies file to socket: nothing of it passes through here. socket.sendfile, not
                # os.sendfile: the connection has a timeout (RUNTIME_IDLE_SECONDS), which makes it non-blocking
                # underneath, and socket.sendfile waits for room where os.sendfile would fail with EAGAIN.
                with os.fdopen(fd, "rb", closefd=False) as source:
                    sent = self.connection.sendfile(source, 0, size)
                if sent < size:  # the file shrank meanwhile: the answer cannot be completed
                    self.close_connection = True
        elif method == "DELETE":
            workspace.delete(path, recursive=query.get("recursive") in ("1", "true"))
            self._json(200, {"deleted": path})
        else:
            self._refuse(405, f"{method} /v1/files: use PUT, GET or DELETE")

    def _chunks(self, length: int) -> Iterator[bytes]:
        left = length
        while left:
            chunk = self.rfile.read(min(left, CHUNK_BYTES))
            if not chunk:
                self.close_connection = True
                return
            left -= len(chunk)
            yield chunk

    def _run(self, run: RunRequest) -> None:
        from agentkube.ebpf.runtime import run_call  # the runtime imports this module

        decoders = {name: codecs.getincrementaldecoder("utf-8")("replace") for name in ("stdout", "stderr")}
        watching = True  # until a write to the gateway fails: the call runs on and is finished regardless

        def chunk(line: bytes) -> bytes:
            return b"%x\r\n%s\r\n" % (len(line), line)

        def send(event: dict | bytes, last: bool = False) -> None:
            """One event (or its JSON line) as a chunk; `last`: with the answer's end in the same write."""
            nonlocal watching
            if not watching:
                return
            data = chunk(event if isinstance(event, bytes) else json.dumps(event).encode() + b"\n")
            try:
                self.wfile.write(data + b"0\r\n\r\n" if last else data)
                self.wfile.flush()
            except OSError:
                watching = False

        started = False

        def placed(_: Started) -> None:
            nonlocal started, watching
            started = True
            try:  # never raises: the call is placed and held, and must be released and finished
                self.send_response(200)
                self.send_header("Content-Type", NDJSON)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self.wfile.flush()
            except OSError:
                watching = False

        def output(stream: str, chunk: bytes) -> None:
            text = decoders[stream].decode(chunk)
            if text:
                send({"stream": stream, "data": text})

        # The gateway keeps the connection for its next call (a new one per call is a TCP handshake through the
        # node's bridge and NetworkPolicy rules, and a new thread here): the last chunk ends this exchange.
        # Every request is checked again (peer, token) whatever came before on the connection.
        try:
            result = run_call(self.server.agent_socket, self.server.sandbox, run, self.server.pool,
                              on_placed=placed, on_output=output)
        except ApiError as error:  # the node agent's verdict
            if not started:
                return self._json(error.status, {"error": error.message})
            send({"error": f"{error.status}: {error.message}"})
        except Exception as error:
            logger.exception("call failed")
            if not started:
                return self._json(500, {"error": f"{type(error).__name__}: {error}"})
            send({"error": f"{type(error).__name__}: {error}"})
        else:
            for stream, decoder in decoders.items():
                rest = decoder.decode(b"", final=True)
                if rest:
                    send({"stream": stream, "data": rest})
            # The result's JSON as pydantic writes it, not parsed and written again.
            send(b'{"result":' + result.model_dump_json().encode() + b"}\n", last=True)
            if watching:
                return
        if watching:
            try:
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
                return
            except OSError:
                pass
        self.close_connection = True  # the gateway went away mid-answer: nothing more to say on this one


class RuntimePortServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, sandbox: SandboxRef, agent_socket: Path, verifier: str, port: int, address: str = "0.0.0.0",
                 pool: WarmPool | None = None, workspace: Workspace | None = None):
        self.sandbox, self.agent_socket, self.verifier, self.pool = sandbox, Path(agent_socket), verifier, pool
        self.processes = ProcessTable(self.agent_socket, sandbox, pool)
        self.workspace = workspace
        super().__init__((address, port), _Handler)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="runtime-port", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.processes.close()
        self.shutdown()
        self.server_close()

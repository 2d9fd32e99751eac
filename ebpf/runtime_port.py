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

Why HTTP/1.1 chunked NDJSON: one request per call, readable by any HTTP client line by line, with no
framing library in the sandbox image (the standard library's server speaks it), and the status code still
says whether the call was placed before a byte of output flows.
"""

from __future__ import annotations

import codecs
import ipaddress
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from agentkube.contract import token_matches
from agentkube.ebpf.models import MAX_REQUEST_BYTES, CallPlaced, RunRequest, SandboxRef
from agentkube.ebpf.unixhttp import ApiError, validation_message

if TYPE_CHECKING:
    from agentkube.ebpf.runtime import WarmPool

logger = logging.getLogger(__name__)

NDJSON = "application/x-ndjson"
RUNTIME_IDLE_SECONDS = 60.0


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

    def _json(self, status: int, body: dict) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _refuse(self, status: int, message: str) -> None:
        self.close_connection = True
        self._json(status, {"error": message})

    def do_GET(self):
        self._refuse(404, f"no such endpoint: GET {self.path}")

    def do_POST(self):
        if from_inside_the_pod(self.client_address[0], self.connection.getsockname()[0]):
            return self._refuse(403, "a process inside this sandbox may not run commands through its runtime")
        token = bearer_token(self.headers.get("Authorization"))
        if token is None or not token_matches(token, self.server.verifier):
            return self._refuse(401, "this port serves the agentkube gateway only: no valid runtime token")
        if self.path != "/v1/run":
            return self._refuse(404, f"no such endpoint: POST {self.path}")
        length = self.headers.get("Content-Length", "")
        if not length.isdigit() or int(length) > MAX_REQUEST_BYTES:
            return self._refuse(413, f"send a Content-Length of at most {MAX_REQUEST_BYTES} bytes")
        try:
            run = RunRequest.model_validate_json(self.rfile.read(int(length)))
        except ValidationError as error:
            return self._refuse(422, validation_message(error))
        self._run(run)

    def _run(self, run: RunRequest) -> None:
        from agentkube.ebpf.runtime import run_call  # the runtime imports this module

        decoders = {name: codecs.getincrementaldecoder("utf-8")("replace") for name in ("stdout", "stderr")}
        watching = True  # until a write to the gateway fails: the call runs on and is finished regardless

        def send(event: dict) -> None:
            nonlocal watching
            if not watching:
                return
            line = json.dumps(event).encode() + b"\n"
            try:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
            except OSError:
                watching = False

        started = False

        def placed(_: CallPlaced) -> None:
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
            send({"result": json.loads(result.model_dump_json())})
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
                 pool: WarmPool | None = None):
        self.sandbox, self.agent_socket, self.verifier, self.pool = sandbox, Path(agent_socket), verifier, pool
        super().__init__((address, port), _Handler)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="runtime-port", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

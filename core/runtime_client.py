"""The gateway's connections to sandbox runtimes: kept alive from one call to the next, and each one proven
before it carries anything that matters.

A pod's address can belong to another pod once the sandbox's pod is gone (and the gateway's watch of
sandboxes can be a moment late to say so), and the hop is plain HTTP on the pod network carrying the
sandbox's runtime token, the command and its env. So each new connection first asks the runtime to prove
itself (`GET /v1/proof?nonce=N`, contract.runtime_proof: an HMAC keyed by the verifier the operator gave
that sandbox's runtime, over a fresh nonce and the sandbox's name), compares the answer in constant time,
and only then sends a request, with the token, on that same connection; a connection is kept for the
sandbox it was proven for only. A listener that fails gets the nonce and nothing else (`NotTheRuntime`).

Why not a pool of an HTTP library's own: the proof must travel on the very connection the call then takes,
and a pool that reconnects on its own would send a call on a connection nobody proved. httpcore (the
connection layer of httpx, already the SDK's client) gives one HTTP/1.1 connection as an object that never
reconnects by itself: a connection that closed fails the request instead.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import httpcore

from agentkube.contract import RUNTIME_PROOF_PATH, proof_matches, proof_nonce

CONNECT_SECONDS = 10.0
PROOF_SECONDS = 5.0  # a listener that accepts and never answers the proof is given up on after this
MAX_PROOF_BYTES = 4096
# Errors of a request on a connection the runtime had already closed (it restarted, or let it go idle)
# before it answered: the runtime answers a call once it is placed, so nothing ran.
_CLOSED = (httpcore.RemoteProtocolError, httpcore.ReadError, httpcore.WriteError, httpcore.ConnectionNotAvailable)


class Unreachable(Exception):
    """No connection could be made (refused, no route, timed out): nothing was sent."""


class StaleConnection(Exception):
    """The connection closed before any answer: the runtime placed nothing."""


class NotTheRuntime(Exception):
    """The listener at the runtime's address did not prove itself the sandbox's runtime: it was sent a nonce
    and nothing else."""


@dataclass(frozen=True)
class Runtime:
    """One sandbox's runtime as the gateway dials it: its address and port, the namespace and name it knows
    itself by (a warm pod's own name) and the token derived for it."""

    address: str
    port: int
    namespace: str
    name: str
    token: str = field(repr=False)

    @property
    def host(self) -> str:
        return f"[{self.address}]" if ":" in self.address else self.address


class Upstream:
    """The runtime's answer: status and headers at once, the body as it comes. Closing it gives the
    connection back for the next call once the answer was read to its end (else the connection is closed)."""

    def __init__(self, pool: RuntimeConnections, runtime: Runtime, connection: httpcore.AsyncHTTP11Connection,
                 response: httpcore.Response):
        self._pool, self._runtime, self._connection, self._response = pool, runtime, connection, response
        self._closed = False
        self.status = response.status
        self.headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in response.headers}

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        stream = self._response.stream
        assert isinstance(stream, AsyncIterable)
        async for chunk in stream:
            yield chunk

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.iter_chunks()])

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._response.aclose()
        self._pool.release(self._runtime, self._connection)

    async def __aenter__(self) -> Upstream:
        return self

    async def __aexit__(self, *_: Any) -> None:
        await self.aclose()


class RuntimeConnections:
    """Proven connections to runtimes, idle ones kept `keepalive_seconds` for the next call to the same
    sandbox's runtime."""

    def __init__(self, keepalive_seconds: float, connect_seconds: float = CONNECT_SECONDS,
                 proof_seconds: float = PROOF_SECONDS):
        self.keepalive_seconds, self.connect_seconds, self.proof_seconds = keepalive_seconds, connect_seconds, proof_seconds
        self._idle: dict[Runtime, list[httpcore.AsyncHTTP11Connection]] = {}
        self._backend = httpcore.AnyIOBackend()
        self._swept = time.monotonic()

    async def request(self, runtime: Runtime, method: str, path: str, *, params: dict[str, str] | None = None,
                      headers: dict[str, str] | None = None, content: bytes | AsyncIterable[bytes] | None = None,
                      connect_seconds: float | None = None) -> Upstream:
        """Send one request with the runtime's token on a proven connection (an idle one, else a new one
        proven first, connecting for at most `connect_seconds`). Raises Unreachable, NotTheRuntime or
        StaleConnection, each before anything ran."""
        connection = await self._take(runtime, connect_seconds or self.connect_seconds)
        sent = {"Authorization": f"Bearer {runtime.token}", **(headers or {})}
        if isinstance(content, bytes):
            sent["Content-Length"] = str(len(content))
        target = path + (f"?{urlencode(params)}" if params else "")
        request = httpcore.Request(method, self._url(runtime, target), headers=self._headers(runtime, sent),
                                   content=content)
        try:
            response = await connection.handle_async_request(request)
        except _CLOSED as error:
            await connection.aclose()
            raise StaleConnection(f"{type(error).__name__}: {error}") from None
        except BaseException:
            await connection.aclose()
            raise
        return Upstream(self, runtime, connection, response)

    def release(self, runtime: Runtime, connection: httpcore.AsyncHTTP11Connection) -> None:
        if connection.is_idle():
            self._idle.setdefault(runtime, []).append(connection)

    async def close(self) -> None:
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                await connection.aclose()

    async def _take(self, runtime: Runtime, connect_seconds: float) -> httpcore.AsyncHTTP11Connection:
        await self._sweep()
        idle = self._idle.get(runtime) or []
        while idle:
            connection = idle.pop()
            if connection.is_idle() and not connection.has_expired():
                return connection
            await connection.aclose()
        self._idle.pop(runtime, None)
        return await self._open(runtime, connect_seconds)

    async def _sweep(self) -> None:
        """Close the idle connections past their keep-alive (those of runtimes no longer called, too). The
        lists are rebuilt before the first await, so no other task sees them half done."""
        now = time.monotonic()
        if now - self._swept < self.keepalive_seconds:
            return
        self._swept = now
        expired = []
        for runtime, connections in list(self._idle.items()):
            keep = [connection for connection in connections if connection.is_idle() and not connection.has_expired()]
            expired += [connection for connection in connections if connection not in keep]
            if keep:
                self._idle[runtime] = keep
            else:
                self._idle.pop(runtime, None)
        for connection in expired:
            await connection.aclose()

    async def _open(self, runtime: Runtime, connect_seconds: float) -> httpcore.AsyncHTTP11Connection:
        try:
            stream = await self._backend.connect_tcp(runtime.address, runtime.port, timeout=connect_seconds)
        except (httpcore.ConnectError, httpcore.ConnectTimeout) as error:
            raise Unreachable(str(error) or type(error).__name__) from None
        connection = httpcore.AsyncHTTP11Connection(httpcore.Origin(b"http", runtime.address.encode(), runtime.port),
                                                    stream, keepalive_expiry=self.keepalive_seconds)
        try:
            await self._prove(connection, runtime)
        except BaseException:
            await connection.aclose()
            raise
        return connection

    async def _prove(self, connection: httpcore.AsyncHTTP11Connection, runtime: Runtime) -> None:
        nonce = proof_nonce()
        timeout = {"read": self.proof_seconds, "write": self.proof_seconds}
        request = httpcore.Request("GET", self._url(runtime, f"{RUNTIME_PROOF_PATH}?nonce={nonce}"),
                                   headers=self._headers(runtime, {}), extensions={"timeout": timeout})
        try:
            response = await connection.handle_async_request(request)
            try:
                body = b""
                stream = response.stream
                assert isinstance(stream, AsyncIterable)
                async for chunk in stream:
                    body += chunk
                    if len(body) > MAX_PROOF_BYTES:
                        raise NotTheRuntime(f"answered the proof with more than {MAX_PROOF_BYTES} bytes")
            finally:
                await response.aclose()
        except httpcore.TimeoutException:
            raise NotTheRuntime(f"gave no proof within {self.proof_seconds:.0f}s") from None
        except httpcore.NetworkError as error:
            raise NotTheRuntime(f"closed the connection instead of proving itself ({type(error).__name__})") from None
        except httpcore.ProtocolError as error:
            raise NotTheRuntime(f"does not speak HTTP/1.1 ({error})") from None
        try:
            proof = json.loads(body).get("proof") if response.status == 200 else None
        except (ValueError, AttributeError):
            proof = None
        if not proof_matches(proof, runtime.token, nonce, runtime.namespace, runtime.name):
            raise NotTheRuntime(f"answered {response.status} without the proof of {runtime.namespace}/{runtime.name}'s "
                                "runtime (an older runtime has no proof to give: restart its pod)")

    @staticmethod
    def _url(runtime: Runtime, target: str) -> httpcore.URL:
        return httpcore.URL(scheme=b"http", host=runtime.address.encode(), port=runtime.port, target=target.encode())

    @staticmethod
    def _headers(runtime: Runtime, headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
        return [(b"Host", f"{runtime.host}:{runtime.port}".encode()),
                *((name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items())]

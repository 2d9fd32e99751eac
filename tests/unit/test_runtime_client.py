"""The gateway's connections to runtimes, against stand-ins on loopback: a connection carries the token and
the call only after the listener proved itself the sandbox's runtime, and is then kept for that runtime's
next calls; a listener that cannot prove it gets a nonce and nothing else. (The real runtime's proof, on the
node: tests/e2e/test_helm.py.)"""

import asyncio
import socket

import pytest
from aiohttp import web

from agentkube import contract
from agentkube.runtime_client import NotTheRuntime, Runtime, RuntimeConnections, Unreachable

KEY = b"k" * 32
TOKEN = contract.runtime_token(KEY, "team", "box", "u-1")


async def _serve(prove_as: str | None, seen: list, close_at_once: bool = False):
    """A listener that records what reaches it; it proves itself with the verifier of `prove_as`'s token
    (None: a listener that is not the runtime and answers something else)."""
    if close_at_once:
        async def refuse(reader, writer):
            seen.append(await reader.read(65536))
            writer.close()

        server = await asyncio.start_server(refuse, "127.0.0.1", 0)
        return server, server.sockets[0].getsockname()[1], server.close

    async def proof(request: web.Request) -> web.Response:
        seen.append(("proof", dict(request.headers), request.transport.get_extra_info("peername")))
        nonce = request.query["nonce"]
        answer = contract.runtime_proof(contract.token_verifier(prove_as), nonce, "team", "box") if prove_as else "0" * 64
        return web.json_response({"proof": answer})

    async def run(request: web.Request) -> web.Response:
        seen.append(("run", dict(request.headers), request.transport.get_extra_info("peername"), await request.read()))
        return web.json_response({"ran": True})

    app = web.Application()
    app.router.add_get(contract.RUNTIME_PROOF_PATH, proof)
    app.router.add_post("/v1/run", run)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, port, runner.cleanup


def _runtime(port: int) -> Runtime:
    return Runtime("127.0.0.1", port, "team", "box", TOKEN)


def test_the_call_goes_only_on_a_connection_the_runtime_proved_itself_on_and_that_connection_is_kept():
    async def scenario():
        seen: list = []
        _, port, stop = await _serve(TOKEN, seen)
        pool = RuntimeConnections(keepalive_seconds=15)
        try:
            for _ in range(3):
                async with await pool.request(_runtime(port), "POST", "/v1/run", content=b'{"argv": ["true"]}',
                                              headers={"Content-Type": "application/json"}) as upstream:
                    assert upstream.status == 200 and await upstream.read() == b'{"ran": true}'
        finally:
            await pool.close()
            await stop()
        kinds = [entry[0] for entry in seen]
        assert kinds == ["proof", "run", "run", "run"]  # proven once, then kept
        assert "Authorization" not in seen[0][1]  # the proof is asked without the token
        assert all(entry[1]["Authorization"] == f"Bearer {TOKEN}" for entry in seen[1:])
        assert len({entry[2] for entry in seen}) == 1  # one connection throughout

    asyncio.run(scenario())


@pytest.mark.parametrize("prove_as", [None, contract.runtime_token(KEY, "team", "box", "u-2")])
def test_a_listener_that_is_not_the_runtime_gets_neither_the_token_nor_the_call(prove_as):
    """Not the runtime at all, or another sandbox object's runtime under the same name (a new uid)."""
    async def scenario():
        seen: list = []
        _, port, stop = await _serve(prove_as, seen)
        pool = RuntimeConnections(keepalive_seconds=15)
        try:
            with pytest.raises(NotTheRuntime):
                await pool.request(_runtime(port), "POST", "/v1/run", content=b'{"argv": ["secret-command"]}')
        finally:
            await pool.close()
            await stop()
        assert [entry[0] for entry in seen] == ["proof"]
        assert TOKEN not in str(seen) and "secret-command" not in str(seen)

    asyncio.run(scenario())


def test_a_listener_that_hangs_up_and_an_address_nobody_listens_on():
    async def scenario():
        seen: list = []
        _, port, stop = await _serve(None, seen, close_at_once=True)
        pool = RuntimeConnections(keepalive_seconds=15, proof_seconds=2)
        try:
            with pytest.raises(NotTheRuntime):
                await pool.request(_runtime(port), "POST", "/v1/run", content=b'{"argv": ["secret-command"]}')
        finally:
            stop()
        assert TOKEN.encode() not in b"".join(seen) and b"secret-command" not in b"".join(seen)
        with socket.socket() as probe:  # a port nobody listens on
            probe.bind(("127.0.0.1", 0))
            free = probe.getsockname()[1]
        with pytest.raises(Unreachable):
            await pool.request(_runtime(free), "POST", "/v1/run", content=b"{}")
        await pool.close()

    asyncio.run(scenario())


def test_the_runtimes_own_port_proves_itself_to_the_gateways_client_and_not_as_another_sandbox(monkeypatch, tmp_path):
    """The real runtime port (ebpf/runtime_port.py) on loopback, its refusal of its own pod set aside for
    this process as for the workspace's test: it proves itself as its own sandbox only, and asked from
    inside its pod it proves nothing."""
    from agentkube.ebpf import runtime_port
    from agentkube.ebpf.models import SandboxRef

    server = runtime_port.RuntimePortServer(SandboxRef(name="box", namespace="team"), tmp_path / "no-agent.sock",
                                            contract.token_verifier(TOKEN), 0, "127.0.0.1")
    server.start()
    port = server.server_address[1]

    async def scenario():
        pool = RuntimeConnections(keepalive_seconds=15)
        try:
            async with await pool.request(_runtime(port), "GET", "/v1/processes") as upstream:
                assert upstream.status == 200 and b"processes" in await upstream.read()
            for other in (Runtime("127.0.0.1", port, "team", "box2", TOKEN),  # another name, same token
                          Runtime("127.0.0.1", port, "team", "box", contract.runtime_token(KEY, "team", "box", "u-2"))):
                with pytest.raises(NotTheRuntime):
                    await pool.request(other, "GET", "/v1/processes")
        finally:
            await pool.close()

    try:
        monkeypatch.setattr(runtime_port, "from_inside_the_pod", lambda peer, local: False)
        asyncio.run(scenario())
        monkeypatch.undo()  # loopback is the pod itself again: no proof for a process inside it

        async def from_inside():
            pool = RuntimeConnections(keepalive_seconds=15)
            with pytest.raises(NotTheRuntime, match="403"):
                await pool.request(_runtime(port), "GET", "/v1/processes")
            await pool.close()

        asyncio.run(from_inside())
    finally:
        server.stop()

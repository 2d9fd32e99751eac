"""The file API's workspace on a real filesystem, attacked the way a tool call could: it runs as the
same user and may plant anything in the workspace (symlinks out, through `..`, to /proc's magic links,
FIFOs) before an upload, download, listing or delete names that path. Nothing outside is read, written,
followed or removed; a failed upload leaves nothing. (No node is needed: the kernel's openat2 is.)"""

import os
from pathlib import Path

import pytest

from agentkube.ebpf.unixhttp import ApiError
from agentkube.ebpf.workspace import Workspace


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Workspace, Path, Path]:
    root, outside = tmp_path / "workspace", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret").write_text("secret")
    (root / "src").mkdir()
    (root / "src" / "main.py").write_text("print(1)\n")
    os.symlink("../outside", root / "out")                  # a directory link leading out through ..
    os.symlink(str(outside / "secret"), root / "secret")     # an absolute link out
    os.symlink("/proc/self/root", root / "magic")            # a magic link to the runtime's own root
    os.symlink("src/main.py", root / "inside")               # a link that stays inside: allowed
    os.symlink("../src", root / "src" / "up")                # .. that stays inside: allowed
    os.mkfifo(root / "fifo")
    return Workspace(root, max_file_bytes=1 << 20), root, outside


def _status(call, *args, **kwargs) -> int:
    try:
        result = call(*args, **kwargs)
    except ApiError as error:
        return error.status
    return 200 if result is not None or call.__name__ == "delete" else 204


def _read(workspace: Workspace, path: str) -> bytes:
    with workspace.read(path) as (fd, size):
        return os.read(fd, size)


def test_files_round_trip_and_links_that_stay_inside_are_followed(tree):
    workspace, root, _ = tree
    entry = workspace.write("build/out/app.sh", 9, iter([b"echo ", b"hi\n!"]), mode=0o755)
    assert entry.size == 9 and entry.mode == 0o755 and (root / "build/out/app.sh").read_bytes() == b"echo hi\n!"
    assert _read(workspace, "inside") == b"print(1)\n" and _read(workspace, "src/up/main.py") == b"print(1)\n"
    listed = {e.name: e.type for e in workspace.list(".").entries}
    assert listed == {"build": "directory", "src": "directory", "out": "symlink", "secret": "symlink",
                      "magic": "symlink", "inside": "symlink", "fifo": "other"}
    workspace.delete("build", recursive=True)
    assert not (root / "build").exists()


def test_a_planted_symlink_never_leads_a_file_operation_out_of_the_workspace(tree):
    workspace, root, outside = tree
    for path in ("out/secret", "secret", "magic/etc/passwd", "magic"):
        assert _status(_read, workspace, path) == 403, path
    for path in ("out", "magic"):
        assert _status(workspace.list, path) == 403, path
    # Writing through a link out is refused; writing *at* a link replaces the link, never its target.
    assert _status(workspace.write, "out/new", 1, iter([b"x"])) == 403
    assert _status(workspace.write, "out/deeper/new", 1, iter([b"x"])) == 403
    workspace.write("secret", 3, iter([b"new"]))
    assert (outside / "secret").read_text() == "secret" and (root / "secret").read_bytes() == b"new"
    assert not (root / "secret").is_symlink()
    # Deleting through a link out is refused; deleting a link removes the link alone, even recursively.
    assert _status(workspace.delete, "out/secret") == 403
    workspace.delete("out", recursive=True)
    assert not (root / "out").exists() and (outside / "secret").read_text() == "secret"
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]


def test_a_recursive_delete_does_not_follow_links_inside_the_tree(tree):
    workspace, root, outside = tree
    (root / "cache").mkdir()
    os.symlink(str(outside), root / "cache" / "escape")
    workspace.delete("cache", recursive=True)
    assert (outside / "secret").read_text() == "secret" and not (root / "cache").exists()


def test_a_fifo_cannot_block_a_download_and_directories_are_not_files(tree):
    workspace, _, _ = tree
    assert _status(_read, workspace, "fifo") == 409
    assert _status(_read, workspace, "src") == 409
    assert _status(workspace.write, "src", 1, iter([b"x"])) == 409  # a directory is not replaced by a file


def test_uploads_are_bounded_and_a_failed_one_leaves_nothing(tree):
    workspace, root, _ = tree
    before = sorted(p.name for p in root.iterdir())
    assert _status(workspace.write, "big", (1 << 20) + 1, iter([b""])) == 413
    assert _status(workspace.write, "short", 10, iter([b"abc"])) == 400          # the body ended early
    assert _status(workspace.write, "long", 2, iter([b"abc"])) == 400            # more than it declared
    assert sorted(p.name for p in root.iterdir()) == before
    assert _status(workspace.delete, "nothing-here") == 404
    assert _status(workspace.delete, "src") == 409  # not empty, and not recursive


# Run in a network namespace of its own, where the runtime port listens on one address and the client
# connects from another: the port refuses a peer on loopback or on its own address (a process inside the pod),
# so a client from outside the pod has another address. TEST-NET-1 addresses never leave the namespace.
_DOWNLOAD_OVER_THE_PORT = r"""
import hashlib, subprocess, sys
from pathlib import Path
import httpx
from agentkube.contract import token_verifier
from agentkube.ebpf import runtime_port
from agentkube.ebpf.models import SandboxRef
from agentkube.ebpf.workspace import Workspace

root = Path(sys.argv[1])
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
for address in ("192.0.2.1/32", "192.0.2.2/32"):
    subprocess.run(["ip", "address", "add", address, "dev", "lo"], check=True)
server = runtime_port.RuntimePortServer(SandboxRef(name="box"), root / "no-agent.sock", token_verifier("t"), 0,
                                        "192.0.2.1", workspace=Workspace(root, 1 << 30))
server.start()
url = f"http://192.0.2.1:{server.server_address[1]}/v1/files"
try:
    # A process inside the pod (here: sending from the port's own address) is refused, token or not.
    with httpx.Client(transport=httpx.HTTPTransport(local_address="192.0.2.1"), timeout=60) as inside:
        refused = inside.get(url, params={"path": "big.bin"}, headers={"Authorization": "Bearer t"})
        assert refused.status_code == 403, refused.status_code
    digest, size = hashlib.sha256(), 0
    with httpx.Client(transport=httpx.HTTPTransport(local_address="192.0.2.2"), timeout=60) as client:
        with client.stream("GET", url, params={"path": "big.bin"}, headers={"Authorization": "Bearer t"}) as response:
            assert response.status_code == 200, response.status_code
            for chunk in response.iter_bytes():
                digest.update(chunk)
                size += len(chunk)
    print(size, digest.hexdigest())
finally:
    server.stop()
"""


def test_the_runtime_port_streams_a_large_download_whole_over_its_timed_connection(tree):
    """The runtime port's connections carry an idle timeout (non-blocking sockets underneath): a download far
    larger than the socket's buffers still arrives whole, to a client from outside the pod; one inside is refused."""
    import hashlib
    import subprocess
    import sys

    _, root, _ = tree
    data = os.urandom(1 << 20) * 48
    (root / "big.bin").write_bytes(data)
    done = subprocess.run(["unshare", "--net", "--", sys.executable, "-c", _DOWNLOAD_OVER_THE_PORT, str(root)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(len(data)), hashlib.sha256(data).hexdigest()]

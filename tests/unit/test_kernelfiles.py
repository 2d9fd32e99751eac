import os

from agentkube.ebpf.kernelfiles import READ_CHUNK_BYTES, pread_text, read_text, write_text


def test_read_text_reads_past_one_chunk(tmp_path):
    path = tmp_path / "big"
    text = "x" * (2 * READ_CHUNK_BYTES + 17)
    path.write_text(text)
    assert read_text(path) == text


def test_pread_text_rereads_an_open_descriptor_from_the_start(tmp_path):
    path = tmp_path / "counter"
    path.write_text("usage_usec 1\n")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert pread_text(fd) == "usage_usec 1\n"
        with open(path, "r+b") as writer:
            writer.write(b"usage_usec 2\n")
        assert pread_text(fd) == "usage_usec 2\n"
    finally:
        os.close(fd)


def test_procfs_reads_as_the_text_layers_do():
    status = read_text(f"/proc/{os.getpid()}/status")
    assert f"PPid:\t{os.getppid()}\n" in status
    with open(f"/proc/{os.getpid()}/cgroup") as file:
        assert read_text("/proc/self/cgroup") == file.read()


def test_write_text_writes_in_one_call(tmp_path):
    path = tmp_path / "oom_score_adj"
    path.write_text("")
    write_text(path, "1000")
    assert path.read_text() == "1000"

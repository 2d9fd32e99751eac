"""Files in a sandbox's workspace, for the gateway's file API: upload, download, list, delete.

Every path is relative to the workspace and must stay inside it, whatever a tool call has planted there
(tool calls run as the same user and may write anything in the workspace, symlinks included). Two layers:

- `workspace_path` (pure) refuses what is never a workspace path: absolute paths, `..`, NUL, overlong names;
- every name is then resolved by the kernel with openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS) from a
  descriptor of the workspace's root: a symlink may point anywhere inside the workspace, one that leads out
  of it (absolute, or through `..`) or through /proc's magic links fails with EXDEV/ELOOP, with no window
  between a check and a use (each step works on descriptors, never on a path again). Uploads go to a
  new file beside the target (O_EXCL | O_NOFOLLOW) renamed over it, so a symlink planted at the target is
  replaced, never followed; a download opens only a regular file (a planted FIFO would block it forever).

Sizes: one upload may not exceed the workspace's size (the AgentSandbox's `spec.workspace.size`, 1Gi when
it declares none) nor the filesystem's free space; it is streamed to disk in chunks, never held whole.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agentkube.ebpf.models import MAX_LIST_ENTRIES, MAX_PATH_CHARS, FileEntry, FileList
from agentkube.ebpf.unixhttp import ApiError

# openat2(2): its number is the same on every architecture (added in Linux 5.6, in the generic table).
SYS_OPENAT2 = 437
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_BENEATH = 0x08
RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS
CHUNK_BYTES = 1024 * 1024
MAX_NAME_BYTES = 255
DEFAULT_FILE_MODE = 0o644


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def openat2(dir_fd: int, path: str, flags: int, mode: int = 0, resolve: int = RESOLVE) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    fd = _libc.syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(dir_fd), ctypes.c_char_p(os.fsencode(path)),
                       ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number), path)
    return int(fd)


def workspace_path(text: str, *, root_allowed: bool = False) -> list[str]:
    """The components of a path inside the workspace, or a 422 that says why it is not one."""
    if not text or len(text) > MAX_PATH_CHARS or "\0" in text:
        raise ApiError(422, f"path: give a path inside the workspace of 1 to {MAX_PATH_CHARS} characters without NUL")
    if text.startswith("/"):
        raise ApiError(422, f"path {text!r}: paths are relative to the workspace (no leading '/')")
    parts = [part for part in text.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ApiError(422, f"path {text!r}: '..' may not appear in a workspace path")
    if any(len(os.fsencode(part)) > MAX_NAME_BYTES for part in parts):
        raise ApiError(422, f"path {text!r}: a name is longer than {MAX_NAME_BYTES} bytes")
    if not parts and not root_allowed:
        raise ApiError(422, f"path {text!r}: name a file or directory inside the workspace, not the workspace itself")
    return parts


def upload_mode(text: str | None) -> int:
    """Permission bits for an uploaded file (octal, e.g. 755); no set-id or sticky bits."""
    if text is None:
        return DEFAULT_FILE_MODE
    if not (3 <= len(text) <= 4) or any(c not in "01234567" for c in text) or int(text, 8) > 0o777:
        raise ApiError(422, f"mode {text!r}: give permission bits in octal, 000 to 777")
    return int(text, 8)


def _refusal(error: OSError, shown: str) -> ApiError:
    """What the caller is told when the kernel refuses a path."""
    if error.errno in (errno.EXDEV, errno.ELOOP):
        return ApiError(403, f"path {shown!r} leads out of the workspace (through a symlink or a magic link): refused")
    if error.errno == errno.ENOENT:
        return ApiError(404, f"no such file or directory in the workspace: {shown!r}")
    if error.errno in (errno.ENOTDIR, errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
        return ApiError(409, f"path {shown!r}: {error.strerror}")
    if error.errno in (errno.EACCES, errno.EPERM):
        return ApiError(403, f"path {shown!r}: permission denied")
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return ApiError(507, "the workspace is full")
    if error.errno == errno.ENOSYS:
        return ApiError(501, "this kernel (or the pod's seccomp profile) has no openat2: files cannot be served safely")
    return ApiError(500, f"path {shown!r}: {error.strerror}")


def _entry(name: str, info: os.stat_result) -> FileEntry:
    kind = ("directory" if stat.S_ISDIR(info.st_mode) else "file" if stat.S_ISREG(info.st_mode)
            else "symlink" if stat.S_ISLNK(info.st_mode) else "other")
    return FileEntry(name=name, type=kind, size=info.st_size, mode=stat.S_IMODE(info.st_mode), modified=info.st_mtime)


class Workspace:
    def __init__(self, root: Path, max_file_bytes: int):
        self.root, self.max_file_bytes = Path(root), max_file_bytes

    @contextmanager
    def _fd(self, parts: list[str], flags: int) -> Iterator[int]:
        root = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fd = openat2(root, "/".join(parts) or ".", flags)
        except OSError as error:
            raise _refusal(error, "/".join(parts) or ".") from None
        finally:
            os.close(root)
        try:
            yield fd
        finally:
            os.close(fd)

    def _directory(self, parts: list[str], create: bool) -> int:
        """A descriptor (O_PATH) of a directory inside the workspace, made with its parents if `create`."""
        root = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for depth in range(len(parts) + 1) if create else (len(parts),):
                here = "/".join(parts[:depth]) or "."
                try:
                    fd = openat2(root, here, os.O_PATH | os.O_DIRECTORY)
                except FileNotFoundError:
                    if not create:
                        raise
                    parent = openat2(root, "/".join(parts[:depth - 1]) or ".", os.O_PATH | os.O_DIRECTORY)
                    try:
                        try:
                            os.mkdir(parts[depth - 1], 0o755, dir_fd=parent)  # mkdirat never follows a symlink
                        except FileExistsError:
                            pass  # made meanwhile (by a call), or a symlink: the open below judges it
                    finally:
                        os.close(parent)
                    fd = openat2(root, here, os.O_PATH | os.O_DIRECTORY)
                if depth < len(parts):
                    os.close(fd)
            return fd
        except OSError as error:
            raise _refusal(error, "/".join(parts)) from None
        finally:
            os.close(root)

    def limit(self) -> int:
        """The most one upload may write now: the workspace's size, and no more than is free."""
        free = os.statvfs(self.root)
        return min(self.max_file_bytes, free.f_bavail * free.f_frsize)

    def write(self, path: str, length: int, chunks: Iterator[bytes], mode: int = DEFAULT_FILE_MODE) -> FileEntry:
        """Write `length` bytes from `chunks` to `path` (made or replaced whole: a reader never sees half a
        file, a failed upload leaves nothing)."""
        parts = workspace_path(path)
        limit = self.limit()
        if length > limit:
            raise ApiError(413, f"{length} bytes is more than one upload may write to this workspace ({limit} bytes: "
                                "its spec.workspace.size, or what is free)")
        parent = self._directory(parts[:-1], create=True)
        temporary = f".{parts[-1][:200]}.agentkube-upload-{secrets.token_hex(6)}"
        try:
            try:
                fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                             dir_fd=parent)
            except OSError as error:
                raise _refusal(error, path) from None
            try:
                written = 0
                with os.fdopen(fd, "wb", buffering=0, closefd=False) as out:
                    for chunk in chunks:
                        written += len(chunk)
                        if written > length:
                            raise ApiError(400, f"the body is longer than its Content-Length ({length})")
                        out.write(chunk)
                if written != length:
                    raise ApiError(400, f"the upload ended after {written} of {length} bytes")
                os.fchmod(fd, mode)
                info = os.fstat(fd)
            except OSError as error:
                raise _refusal(error, path) from None
            finally:
                os.close(fd)
            try:
                os.rename(temporary, parts[-1], src_dir_fd=parent, dst_dir_fd=parent)  # replaces a symlink, never follows it
            except OSError as error:
                raise _refusal(error, path) from None
            temporary = ""
            return _entry(parts[-1], info)
        finally:
            if temporary:
                try:
                    os.unlink(temporary, dir_fd=parent)
                except OSError:
                    pass
            os.close(parent)

    @contextmanager
    def read(self, path: str) -> Iterator[tuple[int, int]]:
        """An open regular file in the workspace and its size (O_NONBLOCK: a planted FIFO cannot block the open)."""
        parts = workspace_path(path)
        with self._fd(parts, os.O_RDONLY | os.O_NONBLOCK) as fd:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ApiError(409, f"path {path!r} is not a regular file")
            yield fd, info.st_size

    def list(self, path: str) -> FileList:
        parts = workspace_path(path, root_allowed=True)
        entries: list[FileEntry] = []
        truncated = False
        with self._fd(parts, os.O_RDONLY | os.O_DIRECTORY) as fd:
            with os.scandir(fd) as found:
                for item in found:
                    if len(entries) == MAX_LIST_ENTRIES:
                        truncated = True
                        break
                    try:
                        entries.append(_entry(item.name, item.stat(follow_symlinks=False)))
                    except FileNotFoundError:
                        continue  # removed while listed
        return FileList(path="/".join(parts) or ".", entries=sorted(entries, key=lambda e: e.name), truncated=truncated)

    def delete(self, path: str, recursive: bool = False) -> None:
        parts = workspace_path(path)
        parent = self._directory(parts[:-1], create=False)
        try:
            info = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
            if stat.S_ISDIR(info.st_mode):
                if recursive:  # descriptor-based, never follows a symlink (shutil.rmtree.avoids_symlink_attacks)
                    shutil.rmtree(parts[-1], dir_fd=parent)
                else:
                    os.rmdir(parts[-1], dir_fd=parent)
            else:  # a file, or a symlink itself (never what it points to)
                os.unlink(parts[-1], dir_fd=parent)
        except OSError as error:
            raise _refusal(error, path) from None
        finally:
            os.close(parent)

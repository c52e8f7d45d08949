"""Cached data that can be trusted: records signed with a per-home key, folder digests, and file locks.

Anyone who can write a cache folder (a cache shared between machines, another user's files) must not be able to run
code or change a result. So a cache record is plain JSON parsed without object hooks (data only) and carries a keyed
MAC (HMAC-SHA256) over its key, value and the sha256 of every file it vouches for; the MAC key is a random secret in
``$SURGEON_HOME/cache.key`` (default ``~/.llm-surgeon``), created with mode 0600 and never stored in the cache. A
record whose MAC, key, shape or files do not check out is reported as a problem and recomputed by the caller.

:func:`file_lock` takes an exclusive ``flock`` on a lock file that is never a symlink: the holder is alive exactly as
long as the lock is held (the kernel releases it when its process dies), which is how a writer tells a live
writer's temporary files from a dead one's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import SurgeonError
from .utils import atomic_write, sha256_file

__all__ = ["surgeon_home", "secret_key", "write_record", "read_record", "folder_digest", "file_lock",
           "open_lock_file", "RECORD_FORMAT"]

RECORD_FORMAT = "surgeon-cache-record/1"
KEY_FILE = "cache.key"


def surgeon_home() -> Path:
    """``$SURGEON_HOME`` (default ``~/.llm-surgeon``): per-user state that is not shared like a cache."""
    return Path(os.environ.get("SURGEON_HOME") or "~/.llm-surgeon").expanduser()


def secret_key() -> bytes:
    """The per-home MAC key: 32 random bytes in ``$SURGEON_HOME/cache.key`` (mode 0600), created on first use.

    Created through a private temporary file and ``os.link`` (atomic, refuses an existing name), so two processes
    starting at once end up with the same key."""
    home = surgeon_home()
    home.mkdir(parents=True, exist_ok=True)
    path = home / KEY_FILE
    if not path.exists():
        tmp = home / f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, secrets.token_hex(32).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process created it first: use theirs
        finally:
            os.unlink(tmp)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise SurgeonError(f"cannot read the cache key {path}: {exc.strerror} (it must be a regular file)") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077 or st.st_uid != os.getuid():
            raise SurgeonError(f"cache key {path} must be a regular file of this user with mode 0600 "
                               f"(is {stat.filemode(st.st_mode)}); remove it and a new one is made")
        key = os.read(fd, 4096).strip()
    finally:
        os.close(fd)
    if len(key) < 32:
        raise SurgeonError(f"cache key {path} is too short; remove it and a new one is made")
    return key


def _mac(key: str, value, files: dict[str, str]) -> str:
    body = json.dumps({"format": RECORD_FORMAT, "key": key, "value": value, "files": files}, sort_keys=True,
                      separators=(",", ":"))
    return hmac.new(secret_key(), body.encode(), hashlib.sha256).hexdigest()


def folder_digest(folder: str | os.PathLike) -> dict[str, str]:
    """sha256 of every regular file below ``folder`` (relative POSIX paths); symlinks are refused."""
    root = Path(folder)
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            raise SurgeonError(f"{p} is a symbolic link; a cached folder holds regular files only")
        if p.is_file():
            out[p.relative_to(root).as_posix()] = sha256_file(p, use_cache=False)
    return out


def write_record(path: str | os.PathLike, key: str, value, files: dict[str, str] | None = None) -> Path:
    """Write ``value`` (JSON data) as the signed record of ``key`` at ``path``, atomically. ``files``: sha256 of
    the files the value stands for (:func:`folder_digest`), checked again by :func:`read_record`."""
    files = dict(files or {})
    record = {"format": RECORD_FORMAT, "key": key, "value": value, "files": files, "mac": _mac(key, value, files)}
    return atomic_write(path, json.dumps(record, indent=1))  # NaN/Infinity kept: a metric may be either


def read_record(path: str | os.PathLike, key: str, *, check: Callable[[object], bool] | None = None,
                folder: str | os.PathLike | None = None) -> tuple[object | None, str | None]:
    """``(value, None)`` for a valid record of ``key``, ``(None, None)`` when there is none, ``(None, problem)``
    when the file is not one: not JSON, another format or key, a wrong MAC, a value ``check`` refuses, or files
    of ``folder`` that differ from the ones the record was written with. Never runs code from the file."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None, "is a symbolic link"
        return None, f"cannot be read ({exc.strerror})"
    with os.fdopen(fd, "rb") as f:
        raw = f.read(64 << 20)
    try:
        record = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None, "is not a JSON record"
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT or set(record) != {
            "format", "key", "value", "files", "mac"}:
        return None, "is not a surgeon cache record"
    files = record["files"]
    if record["key"] != key or not isinstance(files, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        return None, "belongs to another entry"
    if not isinstance(record["mac"], str) or not hmac.compare_digest(record["mac"],
                                                                       _mac(key, record["value"], files)):
        return None, "has a wrong MAC (written elsewhere or tampered with)"
    if check is not None and not check(record["value"]):
        return None, "holds a value of an unexpected shape"
    if folder is not None:
        try:
            actual = folder_digest(folder)
        except (OSError, SurgeonError) as exc:
            return None, f"vouches for files that cannot be read ({exc})"
        if actual != files:
            changed = sorted(k for k in files.keys() | actual.keys() if files.get(k) != actual.get(k))
            return None, f"vouches for files that changed since: {', '.join(changed[:5])}"
    return record["value"], None


def open_lock_file(path: str | os.PathLike) -> int:
    """Open (create) a lock file for ``flock``, refusing a symlink or anything but a regular file, so a planted
    link cannot make the lock truncate or write another file."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SurgeonError(f"lock file {path} is a symbolic link; remove it") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SurgeonError(f"lock file {path} is not a regular file; remove it")
    return fd


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, on_wait: Callable[[], None] | None = None) -> Iterator[Path]:
    """Hold an exclusive ``flock`` on ``path`` for the block, waiting for a live holder (``on_wait`` is called
    once before waiting). The file is left in place: removing it would race with a waiter."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = open_lock_file(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield path
    finally:
        os.close(fd)

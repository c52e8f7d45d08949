"""Small I/O helpers shared by the ``surgeon`` package: cache dir, cached file hashing, atomic writes."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "cache_dir",
    "sha256_file",
    "sha256_bytes",
    "atomic_write",
    "atomic_dir",
    "keep_freed_memory",
    "physical_cores",
    "torch_threads",
]

_CHUNK = 1 << 20


def cache_dir(*parts: str) -> Path:
    """``$SURGEON_CACHE`` (default ``~/.cache/llm-surgeon``), joined with ``parts``, created on demand."""
    root = Path(os.environ.get("SURGEON_CACHE") or Path.home() / ".cache" / "llm-surgeon").expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_bytes(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def _hash_stream(path: Path, progress=None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return h.hexdigest()


def sha256_file(path: str | os.PathLike, *, use_cache: bool = True) -> str:
    """Streamed sha256 of a file, cached in a small sidecar entry keyed by (absolute path, device, inode, size,
    mtime_ns, ctime_ns).

    The sidecar lives in the cache dir (``hashes/``), so read-only model folders work too. The kernel sets the
    change time on every write or replacement and no user call can set it back, so a file rewritten with its old
    size and mtime still misses the entry. Where a hash decides correctness, pass ``use_cache=False``.
    """
    path = Path(path).resolve()
    st = path.stat()
    key = {"path": str(path), "dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
           "ctime_ns": st.st_ctime_ns}
    entry = None
    if use_cache:
        try:
            entry = cache_dir("hashes") / (sha256_bytes(str(path))[:32] + ".json")
            cached = json.loads(entry.read_text())
            if all(cached.get(k) == v for k, v in key.items()) and isinstance(cached.get("sha256"), str):
                return cached["sha256"]
        except (OSError, ValueError):
            pass
    digest = _hash_stream(path)
    if entry is not None:
        with contextlib.suppress(OSError):
            atomic_write(entry, json.dumps({**key, "sha256": digest}))
    return digest


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder next to ``target``; on success it is renamed to ``target``.

    On any error the temporary folder is removed, so a half-written ``target`` never exists. An existing
    ``target`` is replaced only after the new one is complete (moved aside, then deleted).
    """
    target = Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    umask = _umask()
    try:
        yield tmp
        # mkdtemp/mkstemp create private 0700/0600 entries; give the final folder ordinary permissions
        for root, dirs, files in os.walk(tmp):
            os.chmod(root, 0o777 & ~umask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~umask)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.rmdir(old)
            os.rename(target, old)
        os.rename(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def phase_logger(log, every: float = 0.1, interval: float = 5.0, clock=time.monotonic):
    """A ``progress(phase, done, total)`` callback that logs each phase about every ``every`` of its way, and
    whenever it advanced after ``interval`` seconds without a line of any phase (so a long phase is never silent
    longer than that between its updates); a phase that starts again, as in the next shot, is followed from its
    start again."""
    last: dict[str, int] = {}
    said = [clock()]  # when the last line of any phase was written

    def progress(phase: str, done: int, total: int) -> None:
        if done < last.get(phase, 0):
            last[phase] = 0
        now = clock()
        if done == total or done - last.get(phase, 0) >= max(1, int(total * every)) or \
                (done > last.get(phase, 0) and now - said[0] >= interval):
            last[phase], said[0] = done, now
            log.info("%s %d/%d (%.0f%%)", phase, done, total, 100.0 * done / total)

    return progress


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
_kept_memory: bool | None = None


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep and reuse freed memory (for CPU pruning runs); returns whether it is in effect.

    glibc serves every block above its mmap threshold (at most 32 MB) with a fresh mapping and unmaps it when freed,
    so the few-hundred-MB buffers of each calibration batch (the vocabulary head's logits and gradients, activations
    for the backward pass) are page-faulted in again on every batch. With mmap off for malloc and no trimming, freed
    blocks stay in the heap and are reused without new page faults, as jemalloc or tcmalloc would do, without a
    preloaded library. The process keeps its peak memory until it exits. Process-wide, so only the application
    calls it (CPU pruning), never ``surgeon_core``; set ``SURGEON_SYSTEM_MALLOC=1`` to leave the allocator alone. No
    effect (False) outside Linux with glibc."""
    global _kept_memory
    if _kept_memory is None:
        _kept_memory = False
        if sys.platform.startswith("linux") and not os.environ.get("SURGEON_SYSTEM_MALLOC"):
            try:
                libc = ctypes.CDLL(None)
                if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt"):
                    _kept_memory = (libc.mallopt(_M_MMAP_MAX, 0) == 1
                                    and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1)
            except OSError:
                pass
    return _kept_memory


def _cgroup_cpus() -> float | None:
    """The CPU quota of this process's cgroup (v2 ``cpu.max``), in CPUs; None when unlimited or unknown."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (``os.sched_getaffinity``), hyperthread siblings
    counted once, at most the cgroup's CPU quota: torch's compute threads beyond that only contend."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((topo.joinpath("physical_package_id").read_text().strip(),
                       topo.joinpath("core_id").read_text().strip()))
        except OSError:  # no topology (non-Linux, some containers): one core per CPU
            cores.add(("cpu", str(cpu)))
    n = len(cores)
    quota = _cgroup_cpus()
    if quota is not None:
        n = min(n, max(1, int(quota)))
    return max(1, n)


def torch_threads(requested: int | None = None) -> int:
    """Set torch's intra-op thread count to ``requested`` (``compute.threads``), else to :func:`physical_cores`;
    returns the count set."""
    import torch

    n = int(requested) if requested else physical_cores()
    if n < 1:
        raise ValueError(f"threads must be at least 1, got {requested}")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n

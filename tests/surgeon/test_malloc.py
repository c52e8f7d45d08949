"""surgeon.utils.keep_freed_memory: a freed large buffer is reused, not page-faulted in again (Linux, glibc)."""

import os
import subprocess
import sys

import pytest

PROBE = """
import ctypes, resource
from surgeon.utils import keep_freed_memory
kept = keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 256 * 2**20  # far above glibc's largest mmap threshold (32 MB)
def faults_of_a_fresh_buffer():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(SIZE)
    ctypes.memset(p, 1, SIZE)
    libc.free(p)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_a_fresh_buffer()
print(kept, faults_of_a_fresh_buffer())
"""


def _probe(env_extra: dict) -> tuple[bool, int]:
    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True)
    kept, faults = out.stdout.split()
    return kept == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_buffers_are_reused_instead_of_faulted_in_again():
    kept, faults = _probe({})
    system, system_faults = _probe({"SURGEON_SYSTEM_MALLOC": "1"})
    assert kept and not system
    pages = 256 * 2**20 // 4096
    assert system_faults > pages // 2  # glibc maps the buffer afresh: every page faults in again
    assert faults < pages // 20  # kept: the freed heap block is reused

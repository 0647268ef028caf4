import os
import platform
import subprocess
import sys

import pytest

from cnnkit.allocator import reuse_freed_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# In a fresh process (the tuning cannot be undone): where does a 64 MB buffer come from, and is
# the heap kept after it is freed? glibc's mallinfo2 counts mmapped bytes (hblkhd) and the heap (arena).
PROBE = """
import ctypes
import numpy as np
from cnnkit.allocator import reuse_freed_memory

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks "
                                               "fordblks keepcost").split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
tuned = reuse_freed_memory()
before = libc.mallinfo2()
a = np.ones(8 << 20)
during = libc.mallinfo2()
del a
after = libc.mallinfo2()
b = np.ones(8 << 20)
again = libc.mallinfo2()
print(tuned, during.hblkhd - before.hblkhd, after.arena, again.arena)
"""


def probe(**env: str) -> tuple[bool, int, int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout.split()
    return out[0] == "True", int(out[1]), int(out[2]), int(out[3])


@pytest.mark.skipif(not GLIBC, reason="malloc tuning is for glibc")
def test_large_buffers_come_from_the_heap_and_are_kept_for_reuse():
    tuned, mmapped, kept, reused = probe()
    assert tuned and mmapped == 0  # not a fresh mmap...
    assert kept >= 64 << 20 and reused == kept  # ...and after free the next one reuses the same memory
    default, mmapped, _, _ = probe(CNNKIT_MALLOC_TUNING="0")
    assert not default and mmapped >= 64 << 20  # glibc's default: a fresh mmap, unmapped on free


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("CNNKIT_MALLOC_TUNING", "0")
    assert reuse_freed_memory() is False


@pytest.mark.skipif(not GLIBC, reason="malloc tuning is for glibc")
def test_a_run_from_python_is_told_to_tune_malloc_until_it_does():
    code = ("from cnnkit import allocator; print(allocator.untuned_hint() is not None); "
            "allocator.reuse_freed_memory(); print(allocator.untuned_hint() is not None)")

    def said(**env: str) -> list[str]:  # in a fresh process, as a notebook's: the tuning cannot be undone
        environ = {k: v for k, v in os.environ.items() if k != "CNNKIT_MALLOC_TUNING"}
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**environ, **env}).stdout.split()

    assert said() == ["True", "False"]  # told, until it tunes
    assert said(CNNKIT_MALLOC_TUNING="0") == ["False", "False"]  # switched off: nothing to say

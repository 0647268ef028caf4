"""Keep freed host memory for reuse instead of returning it to the OS after every step.

glibc's malloc serves each allocation above 32 MB with a fresh mmap and unmaps it on free. A
CPU training step allocates and frees many such tensors (a batch of 1024 CIFAR-10 images has
activations of 130 MB per layer), so every step faults in and zeroes gigabytes of new pages:
31,700 page faults a second in a cifar10-fast run on the 2-core CPU here, 5% of its time in the
kernel, and more through the caches it flushes. With mmap off and the heap never trimmed, freed
blocks are reused: cifar10-fast's net trained 26% faster at batch 1024 and 38% faster at batch
2000 (benchmarks/RESULTS.md, step-speed-malloc), and a whole cifar10-fast run at batch 2000 at
516 images/s against 410. PyTorch's CPU tuning guide gets this by preloading jemalloc or
tcmalloc; this needs no library to install.

The cost: memory the process frees stays resident until it ends (cifar10-fast's peak went from
3.1 to 3.9 GB); fine for a training process, so `cnnkit` sets it at start, not on import.
`CNNKIT_MALLOC_TUNING=0` leaves malloc as it is.
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1


_state = {"tuned": False}


def reuse_freed_memory() -> bool:
    """Switch glibc's malloc to keep freed memory for reuse; True if it did (Linux with glibc,
    and not switched off by CNNKIT_MALLOC_TUNING=0)."""
    if not _tunable():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # mallopt returns 1 on success
    _state["tuned"] = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, _INT_MAX))
    return _state["tuned"]


def untuned_hint() -> str | None:
    """What a run from Python (a notebook, a script) should be told where glibc's malloc could be tuned
    and is not; None where it is, cannot be or was switched off (CNNKIT_MALLOC_TUNING=0). The `cnnkit`
    command tunes it at start; a library call does not, as the memory it keeps stays with the process."""
    if _state["tuned"] or not _tunable():
        return None
    return ("glibc's malloc is as it is: call cnnkit.allocator.reuse_freed_memory() before training, as the cnnkit "
            "command does, for CPU steps 26-38% faster (freed memory then stays with the process; "
            "CNNKIT_MALLOC_TUNING=0 silences this)")


def _tunable() -> bool:
    return (os.environ.get("CNNKIT_MALLOC_TUNING", "1") != "0" and platform.system() == "Linux"
            and platform.libc_ver()[0] == "glibc")

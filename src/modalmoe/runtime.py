"""Process-wide runtime switches. Nothing here runs on ``import modalmoe``; the CLI and the
benchmarks call ``tune_allocator()`` explicitly.

Why the allocator matters: with glibc's defaults, every temporary above the mmap threshold
(128 KiB to 32 MiB, adjusted dynamically) is mapped fresh from the kernel and page-faulted
on first touch, every step. An MoE layer allocates many large temporaries (sorted tokens,
padded expert blocks, ``[E, D, F]`` weight gradients), and the faults can cost more than the
matmuls: on this project's 2-core machine, our layer at E=64, k=2, forward+backward ran
1.75x (SwiGLU) and 1.96x (GELU) the dense bound with glibc's defaults and 1.30x / 1.36x
tuned (``benchmarks/moe_layer.py --quick --allocator default`` against the default run).
``mallopt(M_MMAP_MAX=0)`` keeps large blocks in the heap and a large trim threshold keeps
freed memory in the process for reuse. tcmalloc or jemalloc through ``LD_PRELOAD`` do the
same job; ``allocator_name()`` reports which one a process runs with.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_state = {"tuned": False}


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def preloaded_allocator() -> str | None:
    """'tcmalloc' or 'jemalloc' when loaded through ``LD_PRELOAD``, else None."""
    preload = os.environ.get("LD_PRELOAD", "")
    for name in ("tcmalloc", "jemalloc"):
        if name in preload:
            return name
    return None


def tune_allocator(trim_threshold: int = 1 << 30) -> str:
    """Keep large temporaries in the heap instead of mapping them fresh each step.

    Calls glibc's ``mallopt(M_MMAP_MAX, 0)`` and ``mallopt(M_TRIM_THRESHOLD, trim_threshold)``.
    Safe to call more than once. Does nothing under a preloaded tcmalloc/jemalloc (they
    already reuse memory) or where glibc is not the allocator.

    Args:
        trim_threshold: bytes of free heap top kept before returning memory to the OS.

    Returns:
        The allocator setting now in force (see ``allocator_name``).
    """
    if preloaded_allocator() is None:
        libc = _libc()
        if (
            libc is not None
            and libc.mallopt(_M_MMAP_MAX, 0) == 1
            and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
        ):
            _state["tuned"] = True
    return allocator_name()


def allocator_name() -> str:
    """The allocator setting of this process: 'tcmalloc', 'jemalloc', 'glibc-tuned',
    'glibc-default', or 'system' (not Linux/glibc)."""
    preloaded = preloaded_allocator()
    if preloaded:
        return preloaded
    if _state["tuned"]:
        return "glibc-tuned"
    return "glibc-default" if _libc() is not None else "system"

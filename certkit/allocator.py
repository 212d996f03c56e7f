"""glibc malloc settings that keep a CPU training step from paying the kernel for its memory every step.

A training step of a small network frees and reallocates the same activation, gradient and noise buffers
every step. By default glibc serves large blocks with their own ``mmap`` (above a threshold it adjusts
as it goes) and returns the top of its heap to the kernel once enough of it is free, so the next step's
buffers are fresh mappings the kernel must fault in and zero again, page by page. Keeping freed memory in
the process instead makes a step reuse the same pages; what it costs is that the process keeps its peak
memory until it exits. The CLI applies this at start-up (``certkit.cli.main``); a library user who wants
it calls :func:`keep_freed_memory` once, or sets :data:`ENVIRONMENT` (glibc's ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_``) in the environment of a process before it starts. The effect on training
speed is in docs/benchmarks.md.
"""

from __future__ import annotations

import ctypes
import sys

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: blocks below this are served from the heap and reused once freed; glibc releases before 2.35 refuse
#: more than half their heap size (32 MiB on 64-bit), the fallback
_MMAP_THRESHOLDS = (1 << 30, 32 << 20)
#: free memory at the top of the heap kept rather than returned to the kernel
_TRIM_THRESHOLD = 1 << 30
#: the same setting as environment variables, for a process started from here (glibc reads them at start-up)
ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": str(_MMAP_THRESHOLDS[0]), "MALLOC_TRIM_THRESHOLD_": str(_TRIM_THRESHOLD)}


def keep_freed_memory() -> bool:
    """Tell glibc to reuse freed memory instead of unmapping and trimming it; False where this is not glibc
    on Linux (nothing is changed there)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None or getattr(libc, "gnu_get_libc_version", None) is None:  # musl and others: no such knobs
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mapped = any(mallopt(_M_MMAP_THRESHOLD, size) for size in _MMAP_THRESHOLDS)
    return mapped and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))

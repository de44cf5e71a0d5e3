"""Process-wide memory settings: large buffers go back to the OS when freed.

glibc serves allocations above its mmap threshold with mmap (returned to the OS on free), but it
raises that threshold after such a free, up to 32 MiB: later 4 MB request messages then come
from the heap and their pages stay with the process. Pinning the threshold keeps a burst of large
messages from growing RSS for good (docs/OPERATIONS.md, "Memory"). Not glibc: nothing to do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 256 * 1024
TRIM_THRESHOLD_BYTES = 4 * 1024 * 1024


def pin_malloc_thresholds() -> bool:
    """Fix glibc's mmap and trim thresholds; False where there is no glibc mallopt."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    ok = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and ok
    if not ok:
        log.warning("could not pin malloc thresholds; large frees may stay with the process")
    return ok

"""Memory and the C allocator: fixed malloc thresholds, giving free pages back to the
system after big runs, and the startup state moved out of the collector's reach."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable

# Runs estimated at least this big give their memory back soon after (TRIM_DELAY_S): a big
# run's hundreds of MB are not held for the next one. Smaller runs' pages stay for the next
# run until the server is idle (IDLE_TRIM_S): handed back after every article run (~70 MB
# estimated), each next run faulted them in again, a few ms of a 35 ms run
TRIM_MIN_BYTES = 256 << 20
TRIM_DELAY_S = 0.5  # after the run: its answer is sent, its last tensors collected
# a sandbox worker whose resident set grew this much in a job gives it back at once
WORKER_TRIM_MIN_BYTES = 32 << 20
# Any run's free pages go back once the server has had no run for this long: memory at rest
# stays low, and a user clicking through the page (runs seconds apart) keeps the warm pages
IDLE_TRIM_S = 10.0


def _libc_function(name: str, argtypes: list) -> Callable[..., int] | None:
    """A glibc function (malloc_trim, mallopt), or None on another C library."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        function = getattr(libc, name)
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = argtypes, ctypes.c_int
    return function


_TRIM = _libc_function("malloc_trim", [ctypes.c_size_t])
_MALLOPT = _libc_function("mallopt", [ctypes.c_int, ctypes.c_int])
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
# Blocks up to this size come from the arenas and are reused; larger ones (a big run's x and
# x.g) are mapped for themselves and unmapped when freed. 32 MiB is glibc's largest.
MMAP_THRESHOLD_BYTES = 32 << 20
# Free memory an arena keeps rather than handing back on every free (release_memory hands
# it all back once a big run is over)
TRIM_THRESHOLD_BYTES = 1 << 30


def tune_allocator() -> bool:
    """Fixed malloc thresholds instead of glibc's moving ones (False on another C library).

    glibc's defaults move: the mmap threshold starts at 128 KiB and rises to each mapped
    block freed, the trim threshold follows at twice that, and an arena whose free top passes
    it is cut back on that free. A chunked broadcast allocates and frees its ~4 MiB chunk
    products hundreds of times; depending on where they landed, each free cut the arena and
    each next chunk faulted its pages in again: the backward at batch 20000 took 1.0-1.2 s
    instead of 0.3-0.4 s, on some runs and not others (the first on a fresh server often)."""
    if _MALLOPT is None:
        return False
    _MALLOPT(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    _MALLOPT(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    return True


def release_memory() -> bool:
    """Give the allocator's free pages back to the system (glibc: malloc_trim(0), which also
    releases free pages inside every thread's arena). False where there is no malloc_trim."""
    if _TRIM is None:
        return False
    # tensors a young reference cycle still holds are freed first. Never a full collection
    # here: it walks every object of the process holding the GIL (seconds with big caches),
    # and every request waits for it; the older generations are the collector's own business
    gc.collect(YOUNG_GENERATIONS)
    _TRIM(0)
    return True


YOUNG_GENERATIONS = 1  # gc.collect(1): generations 0 and 1


def freeze_long_lived() -> None:
    """Move every object alive now (modules, torch's and the app's startup state) out of the
    collector's reach (gc.freeze): later collections walk only what came after. Called once
    the app has started and warmed up; after one full collection, so no garbage is frozen."""
    gc.collect()
    gc.freeze()

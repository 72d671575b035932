"""Handing memory freed by large requests back to the operating system.

glibc keeps freed heap memory in its arenas for reuse; after a burst of large uploads the
process stays at its peak although nothing holds that memory any more. `malloc_trim(0)` returns
the free pages of every arena.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    trim: Callable[[int], int] | None = getattr(ctypes.CDLL(name), "malloc_trim", None)
    return trim  # None: not glibc (musl, macOS), which returns memory its own way


def return_freed_memory() -> None:
    """Returns the free pages of the C heap to the operating system, where the C library can."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)

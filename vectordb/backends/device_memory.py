"""Device copies of what a search reads, made once and kept while their host objects live.

Given the ``cupy`` module by the caller; imports no GPU library itself.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from ..core.codes import FACTORS
from ..core.parts import Part
from ..storage.memory import reading_in_order

__all__ = ["DevicePart", "IdCache", "VectorMirror", "fits", "rotation"]

log = logging.getLogger("vectordb")

#: Bytes per host-to-device copy while mirroring the vectors.
_UPLOAD_BYTES = 64 << 20


class IdCache:
    """Device copies of host objects, dropped when the object dies.

    Keyed by identity: parts, trees and quantizers never change once made (a write makes
    new ones), so the copy of one stays valid as long as the object lives.
    """

    def __init__(self) -> None:
        self._items: dict[int, tuple[weakref.ref[Any], Any]] = {}

    def get(self, obj: Any, make: Callable[[Any], Any]) -> Any:
        key = id(obj)
        hit = self._items.get(key)
        if hit is not None and hit[0]() is obj:
            return hit[1]
        value = make(obj)
        items = self._items

        def forget(_: weakref.ref[Any]) -> None:
            items.pop(key, None)  # runs when obj dies, before its id can be reused

        items[key] = (weakref.ref(obj, forget), value)
        return value


class VectorMirror:
    """A device copy of one storage's vectors, grown as rows are appended.

    Storage rows never change once written, so a sync copies only rows added since the
    last one. A grown copy is a new device array: selectors holding the old one keep it.
    When the copy cannot grow (its new size would pass ``share`` of the free device
    memory, or the allocation fails), it is given up for good: searches then rerank on
    the host, and writes go on.
    """

    def __init__(self, cupy: Any, dim: int, share: float) -> None:
        self._cp = cupy
        self._share = share
        self._buf: Any = cupy.empty((0, dim), dtype=cupy.float32)
        self._n = 0
        self._lock = threading.Lock()

    def sync(self, storage: Any) -> Any:
        """``(n, d)`` float32 device array of the storage's rows as they are now, or
        ``None`` once the copy was given up."""
        cp = self._cp
        with self._lock:
            if self._buf is None:
                return None
            n, dim = int(storage.n), int(self._buf.shape[1])
            try:
                if n > self._buf.shape[0]:
                    rows = max(n, self._buf.shape[0] * 3 // 2)
                    if not fits(cp, 4 * dim * rows, self._share):
                        rows = n
                        if not fits(cp, 4 * dim * rows, self._share):
                            raise MemoryError(f"{rows} vectors no longer fit")
                    grown = cp.empty((rows, dim), cp.float32)
                    grown[: self._n] = self._buf[: self._n]
                    self._buf = grown
                step = max(1, _UPLOAD_BYTES // (4 * max(1, dim)))
                with reading_in_order(storage):
                    for a in range(self._n, n, step):
                        b = min(n, a + step)
                        self._buf[a:b] = cp.asarray(np.ascontiguousarray(storage.slice(a, b)))
            except MemoryError as exc:  # CuPy's OutOfMemoryError is one
                self._buf = None
                log.info("cupy backend: %s; reranking on the host from now on", exc)
                return None
            self._n = n
            return self._buf[:n]


def fits(cupy: Any, nbytes: int, share: float) -> bool:
    """Whether ``nbytes`` fit in ``share`` of the device's free memory."""
    free, _ = cupy.cuda.runtime.memGetInfo()
    return bool(nbytes <= share * free)


class DevicePart:
    """One part's slot arrays on the device (see ``parts.Part``)."""

    def __init__(self, cupy: Any, part: Part, code_rows: int) -> None:
        if part.codes is None or part.factors is None:
            raise TypeError("this part holds no codes")
        self.n = part.size
        self.codes = cupy.asarray(part.codes if part.size else np.zeros((code_rows, 1), np.uint64))
        factors = part.factors if part.size else np.zeros((FACTORS, 1), np.float32)
        self.factors = cupy.asarray(np.ascontiguousarray(factors))
        self.rows_given = part.rows is not None
        rows = part.rows if part.rows is not None and part.size else np.zeros(1, np.int64)
        self.rows = cupy.asarray(rows)
        self.offsets = cupy.asarray(part.offsets)


def rotation(cupy: Any, quantizer: Any) -> tuple[Any, Any, int]:
    """A ``codes.Quantizer`` on the device: ``(perm, blocks transposed, bits)``."""
    if quantizer.perm is None or quantizer.blocks is None:
        return None, None, int(quantizer.bits)
    blocks_t = np.ascontiguousarray(quantizer.blocks.transpose(0, 2, 1))
    return cupy.asarray(quantizer.perm), cupy.asarray(blocks_t), int(quantizer.bits)

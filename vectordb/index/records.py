"""What the write-ahead log holds of one write: its kind, ids, vectors and metadata.

The payload of a log record (``vectordb.storage.wal``), little-endian::

    op u8 | 3 bytes of zeros | n u64 | has_docs u32 | ids (n int64)
    | vectors (n * d float32, not for a delete) | docs (JSON list, if has_docs)

The vectors are logged as the caller gave them (before normalising), so that a replay
prepares them again bit for bit; ids are the ones the write used (assigned ones
included), so that a replay makes the same index.
"""

from __future__ import annotations

import json
import struct

import numpy as np

from .._types import F32, I64
from ..errors import InvalidIndexFileError

__all__ = ["OP_ADD", "OP_DELETE", "OP_UPSERT", "decode_write", "encode_write"]

#: The kinds of logged write.
OP_ADD, OP_UPSERT, OP_DELETE = 1, 2, 3
_WRITE = struct.Struct("<BxxxQI")  # op, n, has_docs


def encode_write(
    op: int, ids: I64, x: F32 | None, docs: list[str | None] | None
) -> list[memoryview]:
    """One write as a log payload, in parts (the record is written from them as they lie,
    a batch's vectors not copied): ``ids`` ``(n,)`` int64, the vectors ``x`` ``(n, d)``
    float32 as given (before normalising: a replay prepares them again, bit for bit),
    ``docs`` the encoded metadata (one JSON string or ``None`` per vector, or ``None``)."""
    head = _WRITE.pack(op, ids.shape[0], docs is not None)
    parts = [memoryview(head), _bytes_of(np.ascontiguousarray(ids, dtype="<i8"))]
    if x is not None:
        parts.append(_bytes_of(np.ascontiguousarray(x, dtype="<f4")))
    if docs is not None:
        parts.append(memoryview(json.dumps(docs).encode("ascii")))
    return parts


def _bytes_of(a: np.ndarray) -> memoryview:
    return a.data.cast("B")  # C-contiguous (the callers make it so)


def decode_write(
    payload: bytes, dim: int, where: str
) -> tuple[int, I64, F32 | None, list[str | None] | None]:
    """The inverse of :func:`encode_write` for an index of dimension ``dim``.
    ``InvalidIndexFileError`` (naming ``where``) for a payload it cannot have written:
    a record's checksum held, so this is not damage but a foreign or newer log."""
    try:
        op, n, has_docs = _WRITE.unpack_from(payload)
        pos = _WRITE.size
        if op not in (OP_ADD, OP_UPSERT, OP_DELETE) or n > len(payload):
            raise ValueError(f"unknown write {op} of {n} rows")
        ids = np.frombuffer(payload, "<i8", n, pos).astype(np.int64)
        pos += 8 * n
        x = None
        if op != OP_DELETE:
            x = np.frombuffer(payload, "<f4", n * dim, pos).reshape(n, dim).copy()
            pos += 4 * n * dim
        docs = None
        if has_docs:
            docs = json.loads(payload[pos:].decode("ascii"))
            if not isinstance(docs, list) or len(docs) != n:
                raise ValueError("metadata does not match the rows")
            if not all(d is None or isinstance(d, str) for d in docs):
                raise ValueError("metadata entries must be JSON text or null")
        elif pos != len(payload):
            raise ValueError("bytes after the rows")
    except (ValueError, struct.error, UnicodeDecodeError) as exc:
        raise InvalidIndexFileError(f"{where}: a write this version cannot read ({exc})") from None
    return op, ids, x, docs

"""Checks a load makes before it uses what it read: no hole (never-written zeros) where
valid content has none, and the consistency of the arrays, so that a damaged or hostile
file that passed the size and header checks cannot make a search index out of bounds,
loop, or answer wrong.

For the compact layout (format versions 1 to 4) and the living one (version 5, see
:mod:`vectordb.storage.format`).
"""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .files import storage_error
from .format import MANIFEST, bad_file

__all__ = ["check_living", "check_no_holes", "check_structure"]


def check_no_holes(fh: io.FileIO, path: Path, start: int, itemsize: int) -> None:
    """Refuse a file with a hole (a range the file system stores no data for: zeros)
    after ``start`` long enough to hold two whole elements of ``itemsize`` bytes.

    Only for files whose valid content never holds two zero elements (``NO_ZERO_RUNS``);
    a no-op where the OS cannot report holes.
    """
    seek_hole, seek_data = getattr(os, "SEEK_HOLE", None), getattr(os, "SEEK_DATA", None)
    if seek_hole is None or seek_data is None:
        return
    fd = fh.fileno()
    end = os.fstat(fd).st_size
    pos = start
    try:
        while pos < end:
            hole = os.lseek(fd, pos, seek_hole)
            if hole >= end:
                return
            try:
                data = min(os.lseek(fd, hole, seek_data), end)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: no data after the hole
                    raise
                data = end
            if data - hole >= 3 * itemsize:
                raise bad_file(
                    path,
                    f"sparse: bytes {hole}..{data} are a hole (zeros that were never "
                    "written), which no valid file of this kind holds",
                )
            pos = data
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            return  # this file system cannot say
        raise storage_error(exc, path) from exc


def _check_tree(file: Path, children: npt.NDArray[Any], n_nodes: int) -> None:
    """A tree rooted at node 0: every other node the child of exactly one node, and all
    reachable from the root. Without it a damaged file could make routing loop forever
    (a child pointing back up) or visit a leaf twice."""
    kids = children[children >= 0]
    if not np.array_equal(np.sort(kids), np.arange(1, n_nodes)):
        raise bad_file(file, "every node but the root must be the child of exactly one node")
    reached, level = 1, np.zeros(1, dtype=np.int64)
    while level.shape[0]:  # visits each node once: every node has one parent, the root none
        level = children[level].ravel()
        level = level[level >= 0]
        reached += level.shape[0]
    if reached != n_nodes:
        raise bad_file(file, f"{n_nodes - reached} nodes are not reachable from the root (a cycle)")


def check_structure(
    directory: Path, arrays: dict[str, npt.NDArray[Any]], n: int, n_nodes: int, n_leaves: int
) -> None:
    """Cheap consistency checks so that a damaged tree cannot index out of bounds."""
    offsets = arrays["leaf_offsets.npy"]
    if offsets[0] != 0 or offsets[-1] != n or (np.diff(offsets) < 0).any():
        raise bad_file(directory / "leaf_offsets.npy", f"must rise from 0 to n={n}")
    children = arrays["children.npy"]
    if ((children < -1) | (children >= n_nodes)).any():
        raise bad_file(directory / "children.npy", f"node ids must lie in [-1, {n_nodes})")
    _check_tree(directory / "children.npy", children, n_nodes)
    leaf_of_node = arrays["leaf_of_node.npy"]
    leaves = np.sort(leaf_of_node[leaf_of_node >= 0])
    if not np.array_equal(leaves, np.arange(n_leaves)):
        raise bad_file(
            directory / "leaf_of_node.npy", f"must number leaves 0..{n_leaves - 1} once each"
        )
    is_leaf = leaf_of_node >= 0
    has_children = (children >= 0).any(axis=1)
    if (is_leaf & has_children).any() or (~is_leaf & ~has_children).any():
        raise bad_file(directory / "children.npy", "leaves must have no children, inner nodes some")
    perm = arrays.get("perm.npy")
    if perm is not None and not np.array_equal(np.sort(perm), np.arange(perm.shape[0])):
        raise bad_file(directory / "perm.npy", "is not a permutation")
    if not np.isfinite(arrays["centroids.npy"]).all():
        raise bad_file(directory / "centroids.npy", "contains NaN or infinite values")
    if "norms.npy" in arrays and not np.isfinite(arrays["norms.npy"]).all():
        raise bad_file(directory / "norms.npy", "contains NaN or infinite values")
    factors = arrays.get("factors.npy")
    # A factor may overflow to inf for vectors near MAX_NORM; NaN never comes of a build.
    if factors is not None and (np.isnan(factors).any() or (factors[3] < 0).any()):
        raise bad_file(directory / "factors.npy", "contains NaN or a negative error bound")


def _check_part(
    directory: Path, offsets: npt.NDArray[Any], rows: npt.NDArray[Any], name: str
) -> None:
    slots = rows.shape[0]
    if offsets[0] != 0 or offsets[-1] != slots or (np.diff(offsets) < 0).any():
        raise bad_file(directory / name, f"must rise from 0 to {slots}")


def check_living(
    directory: Path, arrays: dict[str, npt.NDArray[Any]], manifest: dict[str, Any]
) -> None:
    """The version 5 arrays beyond :func:`check_structure`'s: both parts' offsets, every
    slot naming a distinct storage row, every live row (``ids.npy`` >= 0) in a slot, live
    ids distinct, ``next_id`` past them."""
    n_rows = manifest["rows"]
    slot_rows, delta_rows = arrays["slot_rows.npy"], arrays["delta_rows.npy"]
    _check_part(directory, arrays["delta_offsets.npy"], delta_rows, "delta_offsets.npy")
    both = np.concatenate([slot_rows, delta_rows])
    if both.size and (int(both.min()) < 0 or int(both.max()) >= n_rows):
        raise bad_file(directory / "slot_rows.npy", f"storage rows must lie in [0, {n_rows})")
    in_slot = np.bincount(both, minlength=n_rows)
    if (in_slot > 1).any():
        raise bad_file(directory / "slot_rows.npy", "a storage row is in two slots")
    ids = arrays["ids.npy"]
    live = ids >= 0
    if (ids < -1).any() or int(live.sum()) != manifest["n"]:
        raise bad_file(directory / "ids.npy", f"must hold n={manifest['n']} ids >= 0, -1 elsewhere")
    if (live & (in_slot == 0)).any():
        raise bad_file(directory / "ids.npy", "a live vector is in no slot")
    if np.unique(ids[live]).shape[0] != manifest["n"]:
        raise bad_file(directory / "ids.npy", "ids must be distinct")
    if manifest["n"] and int(ids[live].max()) >= manifest["next_id"]:
        raise bad_file(directory / MANIFEST, "next_id must lie past every id")
    factors = arrays.get("delta_factors.npy")
    if factors is not None and (np.isnan(factors).any() or (factors[3] < 0).any()):
        raise bad_file(directory / "delta_factors.npy", "contains NaN or a negative error bound")

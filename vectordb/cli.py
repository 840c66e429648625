"""The command line: ``vectordb`` (console script) or ``python -m vectordb``.

::

    vectordb build VECTORS.npy OUT_DIR --metric cosine [--ids IDS.npy] [--no-mmap]
    vectordb search OUT_DIR QUERIES.npy -k 10 [--target-recall 0.95 | --probes 16]
                                           [--rerank-factor 5] [--json]
    vectordb info OUT_DIR          n, dim, metric, RAM vs disk bytes, format, checksums
    vectordb verify OUT_DIR        every file's CRC32
    vectordb warm OUT_DIR          read the vector file into the page cache
    vectordb bench [ARGS...]       the benchmark (bench/run.py of a source checkout)

Exit codes: 0 success, 1 an error (one line on standard error; ``--debug`` shows the
traceback), 2 a usage error, 130 an interrupt; ``bench`` exits with the script's code.
Input ``.npy`` files are read memory-mapped, never with pickles allowed (``build
--no-mmap`` then copies the vectors into RAM).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import numpy as np
import numpy.typing as npt

from . import __version__
from ._types import F32, I64
from .errors import InvalidParameterError, VectorDBError
from .index.clustered import ClusteredIndex
from .storage.dirswap import check_replaceable
from .storage.format import MANIFEST, parse_manifest
from .storage.load import manifest_path
from .storage.scratch import scratch_files, scratch_in_use

__all__ = ["bench", "build", "cli", "info", "main", "search", "verify", "warm"]

F = TypeVar("F", bound=Callable[..., Any])

#: Queries searched per batch by ``search`` (bounds its memory on huge query files).
_SEARCH_BATCH = 4096
#: At most this many (query, result) slots per batch: a huge ``-k`` gets smaller batches.
_SEARCH_SLOTS = 1 << 22


class _Failure(click.ClickException):
    """An error for the user: one line, exit code 1."""

    exit_code = 1

    def show(self, file: Any = None) -> None:
        click.echo(f"vectordb: error: {self.format_message()}", err=True)


def _handle_errors(fn: F) -> F:
    """Turn library and OS errors into one-line failures (tracebacks only with --debug)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BrokenPipeError:
            raise  # the reader went away (| head): main() ends quietly
        except (VectorDBError, OSError, ValueError, MemoryError) as exc:
            if click.get_current_context().find_root().params.get("debug"):
                traceback.print_exc()
            raise _Failure(_message(exc)) from exc

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper  # type: ignore[return-value]


def _message(exc: BaseException) -> str:
    if isinstance(exc, MemoryError):
        return f"out of memory ({exc or 'MemoryError'}); try smaller inputs or a smaller -k"
    if isinstance(exc, OSError) and not isinstance(exc, VectorDBError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc) or type(exc).__name__


def _load_npy(path: Path, what: str, *, mmap: bool) -> npt.NDArray[Any]:
    if path.suffix != ".npy":
        raise InvalidParameterError(f"{path}: {what} must be a .npy file (numpy.save)")
    try:
        # Mapped first even when RAM is wanted: a header that promises more data than the
        # file holds fails here, not as a giant allocation.
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise InvalidParameterError(f"{path}: not a readable .npy file ({exc})") from None
    return array if mmap else np.array(array)


def _disk_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vectordb")
@click.option("--debug", is_flag=True, help="Show tracebacks of errors.")
@click.option("-v", "--verbose", is_flag=True, help="Log progress messages (logger 'vectordb').")
@click.option("--no-progress", is_flag=True, help="Never draw progress bars.")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: bool, no_progress: bool) -> None:
    """vectordb: build, search and check vector indexes from the shell."""
    ctx.obj = {"progress": False if no_progress else None}
    if verbose:  # vectordb's own messages only, not every library's
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logger = logging.getLogger("vectordb")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _size(text: str, option: str) -> int:
    """``2G``, ``512M``, ``1048576``: bytes (binary units)."""
    number, unit = text.strip().upper().rstrip("B"), ""
    if number and number[-1] in _UNITS:
        number, unit = number[:-1], number[-1]
    try:
        return int(float(number) * _UNITS[unit])
    except ValueError:
        raise InvalidParameterError(
            f"{option} must be bytes, or a number with K, M, G or T; got {text!r}"
        ) from None


def _progress() -> bool | None:
    obj = click.get_current_context().find_root().obj or {}
    value = obj.get("progress")
    return value if isinstance(value, bool) else None


@cli.command()
@click.argument("vectors", type=click.Path(path_type=Path, dir_okay=False))
@click.argument("out_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option(
    "--metric", type=click.Choice(["l2", "cosine", "ip"]), default="l2", show_default=True
)
@click.option(
    "--ids",
    "ids_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="A .npy of n distinct integers >= 0 (default: 0..n-1).",
)
@click.option(
    "--mmap/--no-mmap",
    default=True,
    show_default=True,
    help="Read VECTORS.npy memory-mapped, so the file's own copy is not held in RAM too.",
)
@click.option("--branching-factor", type=int, default=10, show_default=True)
@click.option("--max-leaf-size", type=int, default=1000, show_default=True)
@click.option(
    "--leaf-scan",
    type=click.Choice(["auto", "codes", "vectors"]),
    default="auto",
    show_default=True,
)
@click.option(
    "--code-bits",
    type=click.Choice(["auto", "1", "2", "3", "4"]),
    default="auto",
    show_default=True,
    help="Bits a coordinate of a code takes (auto: 1 from 128 dimensions up, else 4).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--memory-limit",
    help="Build straight into OUT_DIR holding about this much RAM besides the index's own "
    "(bytes, or with K, M, G: 2G), for inputs larger than RAM.",
)
@click.option("--force", is_flag=True, help="Replace an index already at OUT_DIR.")
@_handle_errors
def build(
    vectors: Path,
    out_dir: Path,
    metric: str,
    ids_path: Path | None,
    mmap: bool,
    branching_factor: int,
    max_leaf_size: int,
    leaf_scan: str,
    code_bits: str,
    seed: int,
    memory_limit: str | None,
    force: bool,
) -> None:
    """Build an index over VECTORS.npy (n x d) and save it to OUT_DIR."""
    limit = None if memory_limit is None else _size(memory_limit, "--memory-limit")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise InvalidParameterError(f"{out_dir} exists and is not empty; use --force to replace it")
    # Checked before hours of building, not at the save.
    check_replaceable(out_dir, MANIFEST, "a vectordb index directory")
    parent = out_dir.resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidParameterError(f"{parent}: not a writable directory for OUT_DIR")
    started = time.perf_counter()
    x = _load_npy(vectors, "VECTORS", mmap=mmap)
    ids = None if ids_path is None else _load_npy(ids_path, "IDS", mmap=False)
    index = ClusteredIndex.build(
        x,
        ids=ids,
        metric=metric,
        branching_factor=branching_factor,
        max_leaf_size=max_leaf_size,
        leaf_scan=leaf_scan,
        code_bits=code_bits if code_bits == "auto" else int(code_bits),
        seed=seed,
        progress=_progress(),
        path=None if limit is None else out_dir,
        memory_limit=limit,
    )
    del x
    if limit is None:
        index.save(out_dir, progress=_progress())
    ram = index.memory_usage_bytes() - index.vector_ram_bytes
    click.echo(
        f"built {len(index):,} x {index.dim} ({index.metric.value}, {index.n_leaves} leaves, "
        f"leaf_scan={index.leaf_scan}, code_bits={index.params['code_bits']}) in "
        f"{time.perf_counter() - started:.1f} s -> {out_dir}; "
        f"{_mb(_disk_bytes(out_dir))} on disk, {_mb(ram)} in RAM when opened with mmap"
    )


@cli.command()
@click.argument("index_dir", type=click.Path(path_type=Path, file_okay=False))
@click.argument("queries", type=click.Path(path_type=Path, dir_okay=False))
@click.option("-k", type=int, default=10, show_default=True, help="Results per query.")
@click.option("--probes", type=int, help="Leaves per query (default: calibrated).")
@click.option("--rerank-factor", type=int, help="Rerank exactly k * this many (default: bound).")
@click.option("--target-recall", type=float, help="Recall@10 to aim at (default: the build's).")
@click.option("--filter", "filter_json", help='Metadata filter as JSON, e.g. \'{"user": "ann"}\'.')
@click.option("--ram", is_flag=True, help="Load the vectors into RAM instead of mapping them.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per query.")
@_handle_errors
def search(
    index_dir: Path,
    queries: Path,
    k: int,
    probes: int | None,
    rerank_factor: int | None,
    target_recall: float | None,
    filter_json: str | None,
    ram: bool,
    as_json: bool,
) -> None:
    """Search INDEX_DIR for the rows of QUERIES.npy ((d,) or (nq, d))."""
    q = _load_npy(queries, "QUERIES", mmap=True)
    if q.ndim == 1:
        q = q[None, :]
    filt = None
    if filter_json is not None:
        try:
            filt = json.loads(filter_json)
        except json.JSONDecodeError as exc:
            raise InvalidParameterError(f"--filter is not valid JSON: {exc}") from None
        if not isinstance(filt, dict):
            raise InvalidParameterError(f"--filter must be a JSON object, got {filter_json!r}")
    with ClusteredIndex.open(index_dir, mmap=not ram) as index:
        # Results past the index's size are padding: a huge -k asks for no more than that.
        k = min(k, max(len(index), 1)) if k >= 1 else k  # k < 1: search_batch says why
        batch = max(1, min(_SEARCH_BATCH, _SEARCH_SLOTS // max(k, 1)))
        for start in range(0, max(q.shape[0], 1), batch):
            block = np.asarray(q[start : start + batch])
            try:
                ids, dists = index.search_batch(
                    block,
                    k,
                    probes=probes,
                    rerank_factor=rerank_factor,
                    filter=filt,
                    target_recall=target_recall,
                )
            except VectorDBError as exc:
                if not start:
                    raise
                rows = f"query rows {start}..{start + block.shape[0] - 1}"
                raise _Failure(f"{exc} (in {rows}; their results were not printed)") from exc
            if start == 0 and not as_json:  # after the first batch: bad input prints nothing
                click.echo("query\trank\tid\tdistance")
            click.echo(_format_hits(start, ids, dists, as_json), nl=False)


def _format_hits(first: int, ids: I64, dists: F32, as_json: bool) -> str:
    """The lines of a batch's results ``(nq, k)``, its first query numbered ``first``."""
    lines = []
    for row in range(ids.shape[0]):
        found = ids[row] >= 0
        hit_ids, hit_dists = ids[row][found].tolist(), dists[row][found].tolist()
        if as_json:
            doc = {"query": first + row, "ids": hit_ids, "distances": hit_dists}
            lines.append(json.dumps(doc))
            continue
        for rank, (i, d) in enumerate(zip(hit_ids, hit_dists, strict=True)):
            lines.append(f"{first + row}\t{rank + 1}\t{i}\t{d:.6g}")
    return "".join(line + "\n" for line in lines)


@cli.command()
@click.argument("index_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_handle_errors
def info(index_dir: Path, as_json: bool) -> None:
    """Describe the index at INDEX_DIR (cheap: file checksums are not read)."""
    with ClusteredIndex.open(index_dir, mmap=True, progress=False) as index:
        path = manifest_path(index_dir)
        manifest = parse_manifest(path.read_bytes()[: (1 << 20) + 1], path)
        ram_mmap = index.memory_usage_bytes()
        vectors = len(index) * index.dim * 4
        facts: dict[str, Any] = {
            "path": str(index_dir),
            "format_version": manifest["format_version"],
            "n": len(index),
            "dim": index.dim,
            "metric": index.metric.value,
            "leaves": index.n_leaves,
            "leaf_scan": index.leaf_scan,
            "code_bits": index.params.get("code_bits", 1),
            "backend": index.backend,
            "params": index.params,
            "disk_bytes": _disk_bytes(index_dir),
            "ram_mmap_bytes": ram_mmap,
            "ram_in_ram_bytes": ram_mmap + vectors,
            "manifest_checksum": "ok" if manifest["format_version"] >= 2 else "none (version 1)",
            "file_checksums": "not read (run: vectordb verify)",
        }
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    width = max(len(key) for key in facts)
    for key, value in facts.items():
        if key.endswith("_bytes"):
            value = f"{value:,} ({_mb(value)})"
        click.echo(f"{key.ljust(width)}  {value}")


@cli.command()
@click.argument("index_dir", type=click.Path(path_type=Path, file_okay=False))
@_handle_errors
def verify(index_dir: Path) -> None:
    """Check every file of INDEX_DIR against its recorded size and CRC32.

    Also warns (standard error; the exit code stays 0) about working files of unsaved
    writes inside it (``.vectors.bin.append-*``, ``.vectors.bin.compact-*``): no part of
    the saved index, which is what its manifest lists.
    """
    started = time.perf_counter()
    with ClusteredIndex.open(index_dir, mmap=True, verify=True, progress=_progress()) as index:
        n = len(index)
    files = sum(1 for p in index_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    click.echo(
        f"OK: {index_dir}: {files} files, {_mb(_disk_bytes(index_dir))}, {n:,} vectors; "
        f"every CRC32 matches ({time.perf_counter() - started:.1f} s)"
    )
    for scratch in scratch_files(index_dir):
        try:
            size = _mb(scratch.stat().st_size)
        except OSError:
            continue  # removed meanwhile (its process saved or closed)
        in_use = scratch_in_use(scratch)
        if in_use:
            whose = "in use by a running process: writes not saved yet"
        elif in_use is None:
            whose = "writes never saved, by a process that died or one still running"
        else:
            whose = "writes never saved, by a process that died; safe to delete"
        click.echo(
            f"vectordb: warning: {scratch.name} ({size}): {whose}. It is no part of the "
            "saved index (a save onto this index directory removes it).",
            err=True,
        )


@cli.command()
@click.argument("index_dir", type=click.Path(path_type=Path, file_okay=False))
@_handle_errors
def warm(index_dir: Path) -> None:
    """Read INDEX_DIR's vector file into the OS page cache (first searches then skip the
    disk; the pages stay cached, shared, after this command exits)."""
    started = time.perf_counter()
    with ClusteredIndex.open(index_dir, mmap=True) as index:
        done = index.warm(progress=_progress())
    click.echo(f"read {_mb(done)} in {time.perf_counter() - started:.1f} s")


@cli.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,  # --help goes to the script
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@_handle_errors
def bench(args: tuple[str, ...]) -> None:
    """Run the benchmark (bench/run.py of a source checkout) with ARGS, e.g.
    "vectordb bench --dataset fashion-mnist --quick"; "vectordb bench --help" shows its
    options. Exits with the script's exit code."""
    script = Path(__file__).resolve().parent.parent / "bench" / "run.py"
    if not script.is_file():
        raise InvalidParameterError(
            "the benchmark ships with the source repository (bench/run.py); run this from "
            "an editable install of a checkout"
        )
    code = subprocess.call([sys.executable, str(script), *args], env=dict(os.environ))
    if code:
        sys.exit(code)  # the script said why


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``vectordb`` console script."""
    try:
        cli.main(args=argv, prog_name="vectordb", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (click.Abort, KeyboardInterrupt):
        click.echo("vectordb: interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        # Whoever read our output stopped (| head); say nothing more to a closed pipe.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)

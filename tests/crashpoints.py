"""Kill a forked child with SIGKILL at its n-th file-system step, to test crash safety.

The child counts every step it takes that changes files and kills itself *before* the
n-th. Steps: ``open`` (and ``os.open``) for writing, ``write``, ``pwrite``, ``flush``,
``fsync``, ``fdatasync``, ``ftruncate``, ``link``, ``mkdir``,
``rename``/``replace`` and the rename exchange, ``unlink``, ``rmdir``, ``rmtree``,
``mkstemp``, and SQLite's own: opening a database file for writing, each statement and
commit on it, its ``close``, and a backup into it, which is run a page at a time (the
same file in the end) so that a kill can land between the pages SQLite writes.
``trace_steps`` runs the action to the end and names its steps, so a test can try every
kill point and say which step it killed.
"""

from __future__ import annotations

import builtins
import json
import os
import shutil
import signal
import sqlite3
import sys
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

__all__ = ["count_steps", "kill_at_step", "trace_steps"]

_WRITE_MODES = set("wax+")


class _Counter:
    def __init__(self, kill_at: int) -> None:
        self.kill_at = kill_at
        self.names: list[str] = []

    def step(self, name: str) -> None:
        self.names.append(name)
        if len(self.names) == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


def _label(what: str, args: tuple[Any, ...]) -> str:
    """``what`` and the base names of its path arguments, e.g. ``rename(a, b)``."""
    paths = [os.path.basename(os.fsdecode(a)) for a in args if isinstance(a, (str, os.PathLike))]
    return f"{what}({', '.join(paths)})"


class _TickingFile:
    """A file object whose writes and flushes are steps."""

    def __init__(self, fh: Any, counter: _Counter, name: str) -> None:
        self._fh = fh
        self._counter = counter
        self._name = name

    def write(self, data: Any) -> int:
        self._counter.step(f"write({self._name})")
        return int(self._fh.write(data))

    def flush(self) -> None:
        self._counter.step(f"flush({self._name})")
        self._fh.flush()

    def __enter__(self) -> _TickingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()

    def __iter__(self) -> Any:
        return iter(self._fh)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)


def _writes_to_disk(database: Any, uri: bool) -> bool:
    """Whether ``sqlite3.connect(database)`` may write a file."""
    name = os.fsdecode(database) if isinstance(database, (str, bytes, os.PathLike)) else ""
    if name in ("", ":memory:") or (uri and ("mode=memory" in name or ":memory:" in name)):
        return False
    return not (uri and "mode=ro" in name)


class _SteppingConnection(sqlite3.Connection):
    """A SQLite connection whose writes to a database file are steps."""

    counter: _Counter
    on_disk = False
    file = ""

    def _step(self, what: str) -> None:
        if self.on_disk:
            self.counter.step(f"sqlite {what}({self.file})")

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        self._step("execute")
        return super().execute(*args, **kwargs)

    def executemany(self, *args: Any, **kwargs: Any) -> Any:
        self._step("executemany")
        return super().executemany(*args, **kwargs)

    def executescript(self, *args: Any, **kwargs: Any) -> Any:
        self._step("executescript")
        return super().executescript(*args, **kwargs)

    def commit(self) -> None:
        self._step("commit")
        super().commit()

    def close(self) -> None:
        self._step("close")
        super().close()

    def backup(self, target: Any, *, pages: int = -1, progress: Any = None, **kw: Any) -> None:
        if not getattr(target, "on_disk", False):
            return super().backup(target, pages=pages, progress=progress, **kw)
        target._step("backup")

        def each_page(status: int, remaining: int, total: int) -> None:
            if progress is not None:
                progress(status, remaining, total)
            if remaining:
                target._step(f"backup page {total - remaining} of {total}")

        return super().backup(target, pages=1, progress=each_page, **kw)


def _instrument(counter: _Counter) -> None:
    """Patch the file-system entry points the library uses (in this process only)."""
    import vectordb.storage.dirswap as dirswap

    def ticking(fn: Callable[..., Any], what: str) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counter.step(_label(what, args))
            return fn(*args, **kwargs)

        return wrapper

    for name in (
        "fsync",
        "fdatasync",
        "pwrite",
        "ftruncate",
        "link",
        "rename",
        "replace",
        "unlink",
        "mkdir",
        "rmdir",
    ):
        setattr(os, name, ticking(getattr(os, name), name))
    real_os_open = os.open

    def os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        # (Not /dev/null: the subprocess that finds libc for the exchange opens it.)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and path != os.devnull:
            counter.step(_label("open", (path,)))
        return real_os_open(path, flags, *args, **kwargs)

    os.open = os_open  # type: ignore[assignment]
    shutil.rmtree = ticking(shutil.rmtree, "rmtree")  # type: ignore[assignment]
    tempfile.mkstemp = ticking(tempfile.mkstemp, "mkstemp")  # type: ignore[assignment]
    real_open, real_fdopen = builtins.open, os.fdopen

    def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if _WRITE_MODES & set(mode):
            counter.step(_label("open", (file,)))
            name = os.path.basename(os.fsdecode(file)) if not isinstance(file, int) else "fd"
            return _TickingFile(real_open(file, mode, *args, **kwargs), counter, name)
        return real_open(file, mode, *args, **kwargs)

    def fdopen(fd: int, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        fh = real_fdopen(fd, mode, *args, **kwargs)
        return _TickingFile(fh, counter, "fd") if _WRITE_MODES & set(mode) else fh

    builtins.open = open_  # type: ignore[assignment]
    os.fdopen = fdopen  # type: ignore[assignment]
    exchange = dirswap._renameat2_exchange

    def exchange_() -> Any:
        fn = exchange()
        return None if fn is None else ticking(fn, "renameat2")

    dirswap._renameat2_exchange = exchange_  # type: ignore[assignment]
    real_connect = sqlite3.connect
    _SteppingConnection.counter = counter

    def connect(database: Any, *args: Any, **kwargs: Any) -> Any:
        on_disk = _writes_to_disk(database, bool(kwargs.get("uri")))
        if on_disk:
            counter.step(_label("sqlite connect", (database,)))
        kwargs.setdefault("factory", _SteppingConnection)
        conn = real_connect(database, *args, **kwargs)
        if isinstance(conn, _SteppingConnection):
            conn.on_disk = on_disk
            conn.file = os.path.basename(os.fsdecode(database))
        return conn

    sqlite3.connect = connect  # type: ignore[assignment]


def _run(action: Callable[[], None], kill_at: int) -> tuple[int, list[str]]:
    """Fork; the child runs ``action`` instrumented. Returns (wait status, its steps)."""
    read, write = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child
        code = 0
        try:
            os.close(read)
            counter = _Counter(kill_at)
            _instrument(counter)
            action()
            data = json.dumps(counter.names).encode()
            while data:
                data = data[os.write(write, data) :]
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as fh:
        reported = fh.read()
    _, status = os.waitpid(pid, 0)
    return status, json.loads(reported) if reported else []


def trace_steps(action: Callable[[], None]) -> list[str]:
    """Run ``action`` in a child to the end; the names of its file-system steps, in order."""
    status, names = _run(action, 0)
    if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
        raise RuntimeError(f"the action failed in the child (status {status})")
    return names


def count_steps(action: Callable[[], None]) -> int:
    """Run ``action`` in a child to the end; the number of file-system steps it took."""
    return len(trace_steps(action))


def kill_at_step(action: Callable[[], None], n: int) -> None:
    """Run ``action`` in a child killed with SIGKILL just before its ``n``-th step."""
    status, _ = _run(action, n)
    if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
        raise RuntimeError(f"the child was not killed at step {n} (status {status})")


def crash_between_renames(path: Any, action: Callable[[], None]) -> None:
    """Run ``action`` (a save into ``path``) in a forked child forced onto the two-rename
    directory swap, which SIGKILLs itself right after the first rename (``path`` to
    ``.NAME.old-*``); check that it died there, leaving both copies beside a missing path."""
    import vectordb.storage.dirswap as dirswap

    name = os.fspath(path).rstrip("/").rsplit("/", 1)[-1]
    pid = os.fork()
    if pid == 0:
        try:
            dirswap._renameat2_exchange = lambda: None  # type: ignore[assignment]
            real = os.rename

            def rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
                real(src, dst, *args, **kwargs)
                if os.path.basename(os.fspath(dst)).startswith(f".{name}.old-"):
                    os.kill(os.getpid(), signal.SIGKILL)

            os.rename = rename  # type: ignore[assignment]
            action()
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    assert not os.path.lexists(path), "the child must die between the renames"
    names = [n for n in os.listdir(os.path.dirname(os.path.abspath(path))) if n.startswith(".")]
    assert any(".old-" in n for n in names) and any(".tmp-" in n for n in names), names

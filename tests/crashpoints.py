"""Kill a forked child with SIGKILL at its n-th file-system step, to test crash safety.

The child counts every step it takes that changes files (``open`` for writing, ``write``,
``flush``, ``fsync``, ``mkdir``, ``rename``/``replace`` and the rename exchange,
``unlink``, ``rmtree``) and kills itself *before* the n-th. ``count_steps`` runs the action
to the end and reports how many steps it took, so a test can try every kill point.
"""

from __future__ import annotations

import builtins
import os
import shutil
import signal
import sys
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

__all__ = ["count_steps", "kill_at_step"]

_WRITE_MODES = set("wax+")


class _Counter:
    def __init__(self, kill_at: int) -> None:
        self.kill_at = kill_at
        self.steps = 0

    def step(self) -> None:
        self.steps += 1
        if self.steps == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


class _TickingFile:
    """A file object whose writes and flushes are steps."""

    def __init__(self, fh: Any, counter: _Counter) -> None:
        self._fh = fh
        self._counter = counter

    def write(self, data: Any) -> int:
        self._counter.step()
        return int(self._fh.write(data))

    def flush(self) -> None:
        self._counter.step()
        self._fh.flush()

    def __enter__(self) -> _TickingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()

    def __iter__(self) -> Any:
        return iter(self._fh)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)


def _instrument(counter: _Counter) -> None:
    """Patch the file-system entry points the library uses (in this process only)."""
    import vectordb._dirswap as dirswap

    def ticking(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counter.step()
            return fn(*args, **kwargs)

        return wrapper

    for name in ("fsync", "rename", "replace", "unlink", "mkdir", "rmdir"):
        setattr(os, name, ticking(getattr(os, name)))
    shutil.rmtree = ticking(shutil.rmtree)  # type: ignore[assignment]
    tempfile.mkstemp = ticking(tempfile.mkstemp)  # type: ignore[assignment]
    real_open, real_fdopen = builtins.open, os.fdopen

    def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        fh = real_open(file, mode, *args, **kwargs)
        if _WRITE_MODES & set(mode):
            counter.step()
            return _TickingFile(fh, counter)
        return fh

    def fdopen(fd: int, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        fh = real_fdopen(fd, mode, *args, **kwargs)
        return _TickingFile(fh, counter) if _WRITE_MODES & set(mode) else fh

    builtins.open = open_  # type: ignore[assignment]
    os.fdopen = fdopen  # type: ignore[assignment]
    exchange = dirswap._renameat2_exchange

    def exchange_() -> Any:
        fn = exchange()
        return None if fn is None else ticking(fn)

    dirswap._renameat2_exchange = exchange_  # type: ignore[assignment]


def _run(action: Callable[[], None], kill_at: int) -> tuple[int, int]:
    """Fork; the child runs ``action`` instrumented. Returns (wait status, steps taken)."""
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
            os.write(write, str(counter.steps).encode())
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as fh:
        reported = fh.read()
    _, status = os.waitpid(pid, 0)
    return status, int(reported or 0)


def count_steps(action: Callable[[], None]) -> int:
    """Run ``action`` in a child to the end; the number of file-system steps it took."""
    status, steps = _run(action, 0)
    if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
        raise RuntimeError(f"the action failed in the child (status {status})")
    return steps


def kill_at_step(action: Callable[[], None], n: int) -> None:
    """Run ``action`` in a child killed with SIGKILL just before its ``n``-th step."""
    status, _ = _run(action, n)
    if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
        raise RuntimeError(f"the child was not killed at step {n} (status {status})")

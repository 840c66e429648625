"""Progress bars (tqdm, on a terminal only, never with progress=False) and warm()."""

from __future__ import annotations

import io
import logging

import pytest

import vectordb as vdb

tqdm = pytest.importorskip("tqdm", reason="progress bars need tqdm (the progress extra)")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def x():
    return vdb.make_clustered(3000, 64, seed=8)


def test_long_work_draws_bars_on_a_terminal_and_nothing_with_progress_false(
    x, tmp_path, monkeypatch
):
    screen = Terminal()
    monkeypatch.setattr("sys.stderr", screen)
    index = vdb.ClusteredIndex.build(x, max_leaf_size=300)
    index.save(tmp_path / "a")
    with vdb.ClusteredIndex.open(tmp_path / "a", verify=True) as opened:
        opened.delete([1, 2])
        opened.compact()
        assert opened.warm() == (len(x) - 2) * x.shape[1] * 4
    drawn = screen.getvalue()
    for step in ("clustering", "coding", "saving", "verifying", "compacting", "warming"):
        assert step in drawn, step
    quiet = Terminal()
    monkeypatch.setattr("sys.stderr", quiet)
    index = vdb.ClusteredIndex.build(x, max_leaf_size=300, progress=False)
    index.save(tmp_path / "b", progress=False)
    with vdb.ClusteredIndex.open(tmp_path / "b", verify=True, progress=False) as opened:
        opened.warm(progress=False)
    assert quiet.getvalue() == ""


def test_no_bars_when_not_a_terminal(x, tmp_path, capsys):
    vdb.ClusteredIndex.build(x, max_leaf_size=300).save(tmp_path / "a")
    assert capsys.readouterr().err == ""


def test_warm_reads_the_mapped_file_and_is_a_no_op_in_ram(x, tmp_path):
    index = vdb.ClusteredIndex.build(x, max_leaf_size=300)
    assert index.warm() == 0
    index.use_mmap_storage(tmp_path / "v.f32")
    assert index.warm(progress=False) == x.nbytes
    index.close()
    with pytest.raises(vdb.IndexClosedError):
        index.warm()


def test_builds_and_saves_are_logged_not_printed(x, tmp_path, caplog, capsys):
    with caplog.at_level(logging.DEBUG, logger="vectordb"):
        index = vdb.ClusteredIndex.build(x, max_leaf_size=300)
        index.save(tmp_path / "a")
    ours = [r for r in caplog.records if r.name.startswith("vectordb")]
    messages = " ".join(r.getMessage() for r in ours)
    assert "built an index of 3000 x 64" in messages and "saved 3000 vectors" in messages
    assert f"{index.n_leaves} leaves" in messages and str(tmp_path / "a") in messages
    # INFO, on the "vectordb" logger: silent unless an application asks for it (Python
    # prints unhandled WARNING records to stderr).
    for start in ("built an index", "saved 3000 vectors"):
        assert [r.levelno for r in ours if r.getMessage().startswith(start)] == [logging.INFO]
    assert all(r.levelno <= logging.INFO for r in ours)
    assert not logging.getLogger("vectordb").handlers or all(
        isinstance(h, logging.NullHandler) for h in logging.getLogger("vectordb").handlers
    )
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""

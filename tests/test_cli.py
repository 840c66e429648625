"""The command line: every command on a real index, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import vectordb as vdb
from vectordb.cli import cli, main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    x = vdb.make_clustered(3000, 64, seed=12)
    np.save(root / "vectors.npy", x[:2900])
    np.save(root / "queries.npy", x[2900:2905])
    np.save(root / "ids.npy", np.arange(2900, dtype=np.int64) * 10)
    return root, x


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["--no-progress", *args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def built(files):
    root, _ = files
    out = root / "index"
    code, stdout, _ = run(
        "build",
        str(root / "vectors.npy"),
        str(out),
        "--metric",
        "cosine",
        "--ids",
        str(root / "ids.npy"),
        "--mmap",
        "--max-leaf-size",
        "200",
    )
    assert code == 0 and "built 2,900 x 64 (cosine" in stdout
    return out


def test_search_prints_what_the_library_returns(files, built):
    root, x = files
    code, stdout, _ = run("search", str(built), str(root / "queries.npy"), "-k", "3")
    assert code == 0
    rows = [line.split("\t") for line in stdout.strip().splitlines()]
    assert rows[0] == ["query", "rank", "id", "distance"] and len(rows) == 1 + 5 * 3
    with vdb.ClusteredIndex.open(built) as index:
        ids, _ = index.search_batch(x[2900:2905], 3)
    assert [int(r[2]) for r in rows[1:]] == ids.ravel().tolist()
    code, stdout, _ = run("search", str(built), str(root / "queries.npy"), "-k", "2", "--json")
    answers = [json.loads(line) for line in stdout.strip().splitlines()]
    assert [a["ids"] for a in answers] == ids[:, :2].tolist()
    assert all(all(i % 10 == 0 for i in a["ids"]) for a in answers)  # the --ids were used


def test_info_verify_warm(built):
    code, stdout, _ = run("info", str(built), "--json")
    facts = json.loads(stdout)
    assert code == 0 and facts["n"] == 2900 and facts["dim"] == 64 and facts["metric"] == "cosine"
    assert facts["format_version"] == 4 and facts["code_bits"] == 4  # 64 d: 4-bit codes
    assert facts["ram_mmap_bytes"] < facts["disk_bytes"]
    code, stdout, _ = run("info", str(built))
    assert code == 0 and "ram_mmap_bytes" in stdout
    code, stdout, _ = run("verify", str(built))
    assert code == 0 and stdout.startswith("OK:")
    code, stdout, _ = run("warm", str(built))
    assert code == 0 and stdout.startswith("read 0.7 MB")


def test_verify_fails_with_exit_1_and_one_line_on_a_damaged_index(built, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    data = bytearray((copy / "vectors.bin").read_bytes())
    data[100] ^= 1
    (copy / "vectors.bin").write_bytes(bytes(data))
    code, stdout, stderr = run("verify", str(copy))
    assert code == 1 and stdout == ""
    assert stderr.count("\n") == 1 and "vectors.bin" in stderr and "CRC32" in stderr
    assert "Traceback" not in stderr
    _, _, stderr = run("--debug", "verify", str(copy))
    assert "Traceback" in stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["search", "{index}", "{root}/missing.npy"], "No such file"),
        (["search", "{index}", "{root}/queries.npy", "-k", "0"], "k must be"),
        (["search", "{index}", "{root}/queries.npy", "--filter", "{{"], "not valid JSON"),
        (["search", "{root}", "{root}/queries.npy"], "manifest.json"),
        (["build", "{root}/vectors.npy", "{index}"], "--force"),
        (["build", "{root}/ids.npy", "{root}/other"], "2-D"),
        (["build", "{root}/vectors.txt", "{root}/other"], ".npy"),
        (["build", "{root}/liar.npy", "{root}/other"], "not a readable .npy"),
        (["build", "{root}/vectors.npy", "{root}/other", "--ids", "{root}/liar.npy"], "liar"),
        (["build", "{root}/vectors.npy", "{root}/junk", "--force"], "refusing to replace"),
        (["build", "{root}/vectors.npy", "{root}/no/such/parent"], "not a writable directory"),
        (["search", "{index}", "{root}/queries.npy", "--filter", "null"], "JSON object"),
        (["info", "{root}"], "not a saved vectordb index"),
    ],
)
def test_bad_input_gives_exit_1_and_one_line(files, built, args, fragment):
    root, _ = files
    (root / "vectors.txt").write_text("1 2 3")
    (root / "junk").mkdir(exist_ok=True)
    (root / "junk" / "notes.txt").write_text("mine")
    # A header that promises 10^10 rows of a 4 KB file: refused, not allocated.
    header = np.lib.format.header_data_from_array_1_0(np.zeros((2, 64), np.float32))
    header["shape"] = (10**10, 64)
    with open(root / "liar.npy", "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        fh.write(bytes(4096))
    argv = [a.format(index=built, root=root) for a in args]
    code, stdout, stderr = run(*argv)
    assert code == 1, stderr
    assert stdout == "" and stderr.startswith("vectordb: error:") and fragment in stderr
    assert stderr.count("\n") == 1


def test_usage_errors_exit_2():
    assert run("search")[0] == 2
    assert run("no-such-command")[0] == 2


def test_python_dash_m_and_the_console_script(built):
    out = subprocess.run(
        [sys.executable, "-m", "vectordb", "info", str(built)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0 and "metric" in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "vectordb", "--version"], capture_output=True, text=True, check=False
    )
    assert vdb.__version__ in out.stdout


def test_a_huge_k_is_capped_at_the_index_size(files, built):
    root, _ = files
    code, stdout, _ = run("search", str(built), str(root / "queries.npy"), "-k", "1048576")
    assert code == 0
    rows = stdout.strip().splitlines()[1:]
    assert len(rows) == 5 * 2900  # every vector once per query, no padding


def test_interrupt_exits_130_and_broken_pipe_is_quiet(built, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(vdb.ClusteredIndex, "open", interrupted)
    with pytest.raises(SystemExit) as info:
        main(["info", str(built)])
    assert info.value.code == 130
    assert capsys.readouterr().err.strip() == "vectordb: interrupted"
    monkeypatch.undo()
    piped = subprocess.run(
        f"{sys.executable} -m vectordb info {built} | head -1",
        shell=True,
        capture_output=True,
        text=True,
        check=False,
    )
    assert piped.stdout.startswith("path") and piped.stderr == ""


def test_saved_files_share_one_mode(built):
    # Readable by whoever may read the other files (process sharing), not 0600 for some.
    # (Write bits aside: the log and the writer's lock file are written to, the rest never.)
    modes = {p.name: p.stat().st_mode & 0o555 for p in built.iterdir() if p.is_file()}
    assert len(set(modes.values())) == 1, modes


def test_build_with_a_memory_limit_builds_on_disk(files, tmp_path):
    root, x = files
    out = tmp_path / "index"
    code, stdout, _ = run(
        "build", str(root / "vectors.npy"), str(out), "--metric", "cosine", "--memory-limit", "96M"
    )
    assert code == 0 and "built 2,900 x 64 (cosine" in stdout
    with vdb.ClusteredIndex.open(out) as index, vdb.ClusteredIndex.open(out) as again:
        assert len(index) == 2900
        np.testing.assert_array_equal(index.search(x[0], 3)[0], again.search(x[0], 3)[0])
        assert index.search(x[0], 1)[0][0] == 0
    code, _, stderr = run(
        "build", str(root / "vectors.npy"), str(tmp_path / "b"), "--memory-limit", "lots"
    )
    assert code != 0 and "--memory-limit must be bytes" in stderr
    code, _, stderr = run(
        "build", str(root / "vectors.npy"), str(tmp_path / "c"), "--memory-limit", "1M"
    )
    assert code != 0 and "at least 64 MiB" in stderr and not (tmp_path / "c").exists()

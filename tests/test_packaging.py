"""The distribution: the sdist and the wheel build, and the wheel, installed into a new
virtual environment, imports and searches (the package from the wheel, not this checkout).
"""

from __future__ import annotations

import email
import re
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NAME = "vectordb-embedded"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: the build backend (hatchling) comes from the test extra, not a download.
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


def test_the_distribution_name_is_ours_and_the_import_name_vectordb(built):
    toml = (ROOT / "pyproject.toml").read_text()
    project = dict(re.findall(r'^(name|version) = "([^"]+)"$', toml, re.M)[:2])
    assert project["name"] == NAME
    with zipfile.ZipFile(built["wheel"]) as whl:
        names = whl.namelist()
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        info = email.message_from_bytes(whl.read(meta))
    assert info["Name"] == NAME and info["Version"] == project["version"]
    requires = info.get_all("Requires-Dist") or []
    assert any(r.startswith("numpy") for r in requires)
    assert any("extra == 'ray'" in r for r in requires), "the optional extras are declared"
    assert "vectordb/__init__.py" in names and "vectordb/py.typed" in names
    assert not [n for n in names if n.startswith(("tests/", "bench/"))]
    with tarfile.open(built["sdist"]) as sdist:
        members = sdist.getnames()
    top = members[0].split("/")[0]
    assert f"{top}/vectordb/__init__.py" in members and f"{top}/pyproject.toml" in members


def test_the_wheel_installs_into_a_new_venv_and_searches(built, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", str(built["wheel"])],
        check=True,
    )
    # Its dependencies (numpy, click, numba) from this environment, after the venv's own
    # site-packages: the vectordb imported is the wheel's.
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    deps = Path(sysconfig.get_paths()["purelib"])
    (Path(site) / "zz_deps.pth").write_text(f"{deps}\n")
    script = textwrap.dedent(
        """
        import numpy as np, vectordb as vdb
        assert "/venv/" in vdb.__file__, vdb.__file__
        x = vdb.make_clustered(2000, 32, seed=0)
        index = vdb.ClusteredIndex.build(x, metric="cosine")
        ids, _ = index.search(x[7], 5)
        assert ids[0] == 7, ids
        print("ok", vdb.__version__)
        """
    )
    done = subprocess.run(
        [str(python), "-I", "-c", script], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok")
    cli = subprocess.run(
        [str(venv / "bin" / "vectordb"), "--help"], capture_output=True, text=True, cwd=tmp_path
    )
    assert cli.returncode == 0 and "build" in cli.stdout

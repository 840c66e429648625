"""The public surface: exported names, the exception tree, metrics, properties."""

from __future__ import annotations
import __future__

import importlib
import importlib.metadata
import inspect
import pkgutil
import types

import numpy as np
import pytest

import vectordb as vdb
import vectordb.errors


def test_all_lists_exactly_the_public_names():
    for name in vdb.__all__:
        assert hasattr(vdb, name), f"__all__ names missing attribute {name!r}"
    assert len(set(vdb.__all__)) == len(vdb.__all__)
    public = {
        name
        for name, value in vars(vdb).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        # ``from __future__ import annotations`` binds a name; it is no export.
        and not isinstance(value, __future__._Feature)
    }
    assert public == set(vdb.__all__) - {"__version__"}


def test_star_import_gives_the_public_names():
    namespace: dict[str, object] = {}
    exec("from vectordb import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(vdb.__all__)


@pytest.mark.parametrize(
    "module", [m.name for m in pkgutil.walk_packages(vdb.__path__, "vectordb.")]
)
def test_every_module_all_is_resolvable(module):
    mod = importlib.import_module(module)
    for name in getattr(mod, "__all__", []):
        assert hasattr(mod, name), f"{module}.__all__ names missing {name!r}"


def test_version_matches_the_installed_distribution():
    assert vdb.__version__ == importlib.metadata.version("vectordb-embedded")


# --------------------------------------------------------------------------- errors


def test_errors_module_exports_every_exception_class():
    classes = {
        name
        for name, value in vars(vectordb.errors).items()
        if inspect.isclass(value)
        and issubclass(value, BaseException)
        and value.__module__ == "vectordb.errors"
    }
    assert classes == set(vectordb.errors.__all__)


@pytest.mark.parametrize("name", vectordb.errors.__all__)
def test_every_error_is_a_vectordb_error_exported_at_top_level(name):
    error = getattr(vectordb.errors, name)
    assert issubclass(error, vdb.VectorDBError)
    assert getattr(vdb, name) is error
    assert name in vdb.__all__


@pytest.mark.parametrize(
    ("error", "builtin"),
    [
        (vdb.InvalidParameterError, ValueError),
        (vdb.InvalidVectorsError, ValueError),
        (vdb.DimensionMismatchError, ValueError),
        (vdb.StorageError, OSError),
    ],
)
def test_errors_are_also_builtin_exceptions(error, builtin):
    assert issubclass(error, builtin)


@pytest.mark.parametrize(
    "error", [vdb.AlreadyUsingMmapError, vdb.IndexClosedError, vdb.InvalidIndexFileError]
)
def test_state_and_file_errors_are_not_value_errors(error):
    assert not issubclass(error, (ValueError, OSError))


def test_dimension_mismatch_is_an_invalid_vectors_error():
    assert issubclass(vdb.DimensionMismatchError, vdb.InvalidVectorsError)


def test_storage_error_carries_errno_and_filename():
    error = vdb.StorageError(28, "No space left on device", "/some/file")
    assert (error.errno, error.strerror, error.filename) == (
        28,
        "No space left on device",
        "/some/file",
    )


# --------------------------------------------------------------------------- metric


@pytest.mark.parametrize(
    ("spelling", "metric"),
    [
        ("l2", vdb.Metric.L2),
        ("L2", vdb.Metric.L2),
        ("cosine", vdb.Metric.COSINE),
        ("COSINE", vdb.Metric.COSINE),
        ("CoSiNe", vdb.Metric.COSINE),
        ("ip", vdb.Metric.IP),
        ("IP", vdb.Metric.IP),
        ("Ip", vdb.Metric.IP),
        (vdb.Metric.IP, vdb.Metric.IP),
    ],
)
def test_metric_names_are_case_insensitive(small, spelling, metric):
    index = vdb.ClusteredIndex.build(small.vectors[:200], metric=spelling)
    assert index.metric is metric


def test_metric_is_a_string_enum():
    assert [m.value for m in vdb.Metric] == ["l2", "cosine", "ip"]
    assert vdb.Metric.COSINE == "cosine"
    assert str(vdb.Metric.IP) == "ip"
    assert vdb.Metric("l2") is vdb.Metric.L2


# --------------------------------------------------------------------------- properties


def test_index_properties(small, shared_index):
    index = shared_index(small, "cosine", max_leaf_size=200, branching_factor=4, seed=9)
    assert len(index) == len(small.vectors)
    assert index.dim == small.dim
    assert index.metric == "cosine"
    assert 1 < index.n_leaves <= len(small.vectors)
    assert index.params == {
        "branching_factor": 4,
        "max_leaf_size": 200,
        "max_iterations": 20,
        "seed": 9,
        "rotate": True,
        "leaf_scan": "codes",
        "code_bits": 4,  # below 128 dimensions
        "leaf_target": index.params["leaf_target"],
        "target_recall": 0.95,
        "calibration": index.params["calibration"],
    }
    calibration = index.params["calibration"]
    assert calibration["k"] == 10 and calibration["recall"][-1] >= 0.995
    assert calibration["n"] == len(index) and calibration["leaves"] == index.n_leaves
    assert calibration["probes"] == sorted(calibration["probes"])
    assert not index.is_using_mmap and index.mmap_path is None
    text = repr(index)
    assert "n=2000" in text and "dim=32" in text and "cosine" in text


def test_params_is_a_copy(small, shared_index):
    index = shared_index(small, max_leaf_size=200)
    index.params["seed"] = 99
    assert index.params["seed"] == 0


def test_search_result_types(small, shared_index):
    index = shared_index(small, max_leaf_size=200)
    ids, dists = index.search(small.queries[0], k=4)
    assert ids.shape == dists.shape == (4,)
    assert ids.dtype == np.int64 and dists.dtype == np.float32
    ids, dists = index.search_batch(small.queries[:3], k=4)
    assert ids.shape == dists.shape == (3, 4)
    assert ids.dtype == np.int64 and dists.dtype == np.float32


def test_default_k_is_10(small, shared_index):
    index = shared_index(small, max_leaf_size=200)
    assert index.search(small.queries[0])[0].shape == (10,)
    assert index.search_batch(small.queries[:2])[0].shape == (2, 10)


# --------------------------------------------------------------------------- synthetic data


def test_make_clustered_is_seeded():
    a = vdb.make_clustered(300, 24, seed=4)
    assert a.shape == (300, 24) and a.dtype == np.float32
    assert np.isfinite(a).all()
    np.testing.assert_array_equal(a, vdb.make_clustered(300, 24, seed=4))
    assert not np.array_equal(a, vdb.make_clustered(300, 24, seed=5))


def test_docstring_example():
    x = vdb.make_clustered(2000, 64, seed=1)
    index = vdb.ClusteredIndex.build(x, max_leaf_size=200)
    ids, _ = index.search(x[7], k=3)
    assert int(ids[0]) == 7

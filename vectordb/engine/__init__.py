"""The async engine: concurrent ``await engine.search(...)`` with micro-batching."""

from __future__ import annotations

from .core import AsyncEngine
from .lifecycle import EngineState
from .stats import EngineStats

__all__ = ["AsyncEngine", "EngineState", "EngineStats"]

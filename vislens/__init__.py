"""vislens: an activation store and offline analysis engine for vision LLMs."""

from __future__ import annotations

__version__ = "0.1.0"

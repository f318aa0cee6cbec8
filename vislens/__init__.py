"""vislens: an activation store and offline analysis engine for vision LLMs.

``vislens.open_store(url)`` opens a store as an `xarray.DataTree`; `vislens.analyze` holds the
analyses, `vislens.extract` the extraction, `vislens.kernels` the fused kernels.
"""

from __future__ import annotations

__version__ = "0.1.0"

from vislens.store import open_store  # noqa: E402

__all__ = ["__version__", "open_store"]

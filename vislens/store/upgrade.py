"""Read older store formats as the current one: version 1 stores are upgraded on open (in memory).

Version 1 differs from version 2 in three ways: the decoder's width dimension was named
``hidden`` (like the variable ``hidden``, so xarray made that variable a coordinate), the
attention group numbered decoder layers 0 .. L-1, and there was no ``token_role`` array.
Opening a version 1 store renames the dimension to ``d_model``, renumbers attention layers
1 .. L, and leaves ``token_role`` absent (analyses that need it say so). Nothing on disk changes.
"""

from __future__ import annotations

import xarray as xr

V1_WIDTH_DIM = "hidden"
WIDTH_DIM = "d_model"


def _rename_width(ds: xr.Dataset) -> xr.Dataset:
    if V1_WIDTH_DIM not in ds.dims:
        return ds
    if V1_WIDTH_DIM in ds.coords:
        ds = ds.reset_coords(V1_WIDTH_DIM)
    return ds.rename_dims({V1_WIDTH_DIM: WIDTH_DIM})


def _renumber_attention(ds: xr.Dataset) -> xr.Dataset:
    layer = ds["layer"]
    attrs = dict(layer.attrs)
    attrs["long_name"] = (
        "decoder layer l (1 .. L): its input is activations layer l - 1, its output activations layer l"
    )
    attrs["upgraded_from_v1"] = "stored as 0 .. L-1 in the version 1 store"
    return ds.assign_coords(layer=xr.Variable("layer", layer.values + 1, attrs=attrs))


def upgrade_v1(tree: xr.DataTree) -> xr.DataTree:
    """A version 1 store's tree in the version 2 layout (lazy; the data are not read)."""
    groups: dict[str, xr.Dataset] = {"/": tree.to_dataset(inherit=False)}
    for name, node in tree.children.items():
        ds = _rename_width(node.to_dataset(inherit=False))
        if name == "attention" and "layer" in ds.coords:
            ds = _renumber_attention(ds)
        groups[name] = ds
    out = xr.DataTree.from_dict(groups)
    out.attrs = dict(tree.attrs)
    out.attrs["vislens_read_as_version"] = 2
    return out

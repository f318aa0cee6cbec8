"""Capture points beyond the decoder's residual stream (``vislens extract --capture``).

Named points mean the same in every family that has them (the adapter knows where they are):

- ``residual``: the decoder's hidden states (``activations/hidden``, the default);
- ``vision.layers``: the output of every vision-tower encoder layer, ``captures/vision_layers``
  (sample, vision_layer, vision_token, vision_d); the patch grid is in its attributes;
- ``projector``: the image features in the decoder's space, one row per image token, before
  they are placed into the sequence, ``captures/projector`` (sample, image_token, d_model);
- ``decoder.attn_out`` / ``decoder.mlp_out``: what each decoder layer's attention / MLP block
  adds to the residual stream, ``captures/attn_out`` / ``captures/mlp_out`` (sample, layer,
  token, d_model), layer l = decoder layer l (1 .. L);
- ``re:REGEX``: the output of every module whose name (``model.named_modules()``) matches,
  ``captures/<name with dots as _>`` (sample, token or <name>_dim<i> ...).

Hooks are context managers that always remove themselves. Outputs are kept in fp16, like the
hidden states.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from vislens.errors import ConfigError, ModelError

POINTS = ("residual", "vision.layers", "projector", "decoder.attn_out", "decoder.mlp_out")


def parse_capture(text: str) -> tuple[str, ...]:
    """``--capture``: comma-separated points and ``re:REGEX`` items (a regex may not hold a comma)."""
    items = tuple(p.strip() for p in text.split(",") if p.strip())
    for item in items:
        if item.startswith("re:"):
            try:
                re.compile(item[3:])
            except re.error as exc:
                raise ConfigError(f"--capture {item!r}: not a valid regular expression ({exc})") from None
        elif item not in POINTS:
            raise ConfigError(f"--capture takes {', '.join(POINTS)} or re:REGEX, got {item!r}")
    return items


@dataclass(frozen=True)
class CaptureArray:
    """One array of the ``captures`` group: its name, capture point, dims and sizes (after ``sample``)."""

    name: str
    point: str
    dims: tuple[str, ...]
    sizes: tuple[int, ...]
    attrs: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def _modules(adapter: Any, point: str) -> list[tuple[str, torch.nn.Module]]:
    """(array name, module) pairs of one capture point."""
    if point == "vision.layers":
        layers = adapter.vision_layers
        if layers is None:
            raise ModelError(
                f"--capture vision.layers is not available for the {adapter.family} family (its vision tower does not "
                "see one image per sample); capture its modules with re:REGEX instead"
            )
        return [("vision_layers", m) for m in layers]
    if point == "projector":
        if adapter.projector is None:
            raise ModelError(f"--capture projector: the {adapter.family} family has no projector vislens knows")
        return [("projector", adapter.projector)]
    if point == "decoder.attn_out":
        return [("attn_out", adapter.decoder_attention(i)) for i in range(len(adapter.layers))]
    if point == "decoder.mlp_out":
        return [("mlp_out", adapter.decoder_mlp(i)) for i in range(len(adapter.layers))]
    pattern = re.compile(point[3:])
    found = [(name, m) for name, m in adapter.model.named_modules() if name and pattern.fullmatch(name)]
    if not found:
        raise ModelError(f"--capture {point}: no module name matches (names are those of model.named_modules())")
    return [(re.sub(r"[^A-Za-z0-9_]", "_", name), m) for name, m in found]


def _tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple | list) else output


@contextmanager
def capture_modules(adapter: Any, points: tuple[str, ...]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record the outputs of the capture points' modules during a forward pass (hooks always removed).

    Yields a dict: array name -> outputs in module order (one per layer for the layered points).
    """
    outputs: dict[str, list[torch.Tensor]] = {}
    handles = []

    def hook(name: str):
        def record(module: torch.nn.Module, args: Any, output: Any) -> None:
            outputs.setdefault(name, []).append(_tensor(output).detach().to(torch.float16))

        return record

    try:
        for point in points:
            if point == "residual":
                continue
            for name, module in _modules(adapter, point):
                handles.append(module.register_forward_hook(hook(name)))
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def stacked(outputs: dict[str, list[torch.Tensor]], batch: int, family: str) -> dict[str, torch.Tensor]:
    """Array name -> (batch, ...) tensor: layered points stacked on dim 1; the batch checked.

    Raises
    ------
    ModelError
        When a module's outputs are not one row per sample (e.g. a vision tower over image tiles).
    """
    out = {}
    for name, parts in outputs.items():
        tensor = torch.stack(parts, dim=1) if len(parts) > 1 else parts[0]
        if tensor.shape[0] != batch:
            raise ModelError(
                f"captured {name} has {tensor.shape[0]} rows for a batch of {batch} samples (the {family} family runs "
                "this module over tiles or a flattened batch); capture another module, or use --batch-size 1"
                if batch > 1
                else f"captured {name} has {tensor.shape[0]} rows for one sample; it cannot be stored per sample"
            )
        out[name] = tensor
    return out


def describe(
    adapter: Any, tensors: dict[str, torch.Tensor], points: tuple[str, ...], n: int, n_tokens: int
) -> tuple[CaptureArray, ...]:
    """The arrays of the ``captures`` group, from one probe sample of ``n`` tokens (batch of 1).

    A dimension that equals the probe's token count is the store's ``token`` dimension
    (``n_tokens`` long, right-padded).
    """
    arrays = []
    point_of = {}
    for point in points:
        if point != "residual":
            for name, _ in _modules(adapter, point):
                point_of.setdefault(name, point)
    for name, tensor in tensors.items():
        shape = tuple(tensor.shape[1:])
        point = point_of[name]
        attrs: dict[str, Any] = {"capture_point": point}
        if name in ("attn_out", "mlp_out"):
            dims = ("layer", "token", "d_model")
            attrs["long_name"] = (
                f"what decoder layer l's {'attention' if name == 'attn_out' else 'MLP'} block adds to the residual stream"
            )
        elif name == "vision_layers":
            dims = ("vision_layer", "vision_token", "vision_d")
            attrs["long_name"] = "output of vision-tower encoder layer l (1 .. L_v)"
            attrs.update(_grid(adapter, shape[1]))
        elif name == "projector":
            dims = ("image_token", "d_model")
            attrs["long_name"] = "image features in the decoder's space (the projector's output), in image-token order"
        else:
            dims = tuple("token" if size == n else f"{name}_dim{i + 1}" for i, size in enumerate(shape))
            attrs["long_name"] = f"output of module matching {point[3:]!r}"
        sizes = tuple(n_tokens if d == "token" else size for d, size in zip(dims, shape))
        arrays.append(CaptureArray(name, point, dims, sizes, attrs))
    return tuple(arrays)


def _grid(adapter: Any, tokens: int) -> dict[str, Any]:
    """Patch grid of the vision tower's tokens: rows, cols and the leading non-patch tokens (CLS)."""
    cfg = getattr(adapter.model.config, "vision_config", None)
    size, patch = getattr(cfg, "image_size", 0), getattr(cfg, "patch_size", 0)
    side = size // patch if size and patch else 0
    return {"patch_grid": [side, side], "prefix_tokens": tokens - side * side if side else 0}

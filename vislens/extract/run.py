"""The extraction loop: batches of (image, prompt) through the model, samples into the store."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

import vislens
from vislens import runtime
from vislens.errors import ImageError, ModelError
from vislens.extract.adapters import LoadedModel, load_adapter
from vislens.extract.capture import capture_attention
from vislens.extract.config import COMPUTE, ExtractConfig, fingerprint, parse_layers
from vislens.extract.datasets import DataSet, load_data
from vislens.extract.final_norm import FinalNormCheck, check_final_norm
from vislens.extract.host import HostBatch
from vislens.extract.images import load_image
from vislens.extract.modules import CaptureArray, capture_modules, describe, stacked
from vislens.extract.plan import Sample, make_plan, query_capacity
from vislens.store import schema
from vislens.store.create import CaptionData, LensData, StoreSpec
from vislens.store.location import as_location
from vislens.store.writer import PipelinedWriter, prepare_store, shard_blocks

log = logging.getLogger("vislens.extract")


@dataclass
class ExtractResult:
    """What one extraction run did."""

    store: str
    n_samples: int
    written: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    already_done: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        """One paragraph for the terminal."""
        text = (
            f"{self.store}: {self.written} samples written in {self.seconds:.1f} s, "
            f"{self.already_done} already done, {len(self.skipped)} skipped, of {self.n_samples}"
        )
        for image, reason in list(self.skipped.items())[:20]:
            text += f"\n  skipped {image}: {reason}"
        if len(self.skipped) > 20:
            text += f"\n  ... and {len(self.skipped) - 20} more"
        return text


def model_attrs(loaded: LoadedModel) -> dict[str, Any]:
    """Provenance of the model for the store's root attributes."""
    adapter = loaded.adapter
    cfg = adapter.text_config
    shape = adapter.attention_shape
    return {
        "name_or_path": loaded.name_or_path,
        "revision": loaded.revision,
        "commit_hash": loaded.commit_hash,
        "architecture": type(adapter.model).__name__,
        "model_type": adapter.model.config.model_type,
        "family": adapter.family,
        "n_layers": len(adapter.layers),
        "hidden_size": int(cfg.hidden_size),
        "n_heads": shape.n_heads,
        "n_kv_heads": shape.n_kv_heads,
        "head_dim": shape.head_dim,
        "vocab_size": int(adapter.unembedding.shape[0]),
        "image_token_id": adapter.image_token_id,
        "dtype": str(adapter.model.dtype).removeprefix("torch."),
        "attn_implementation": "eager",
    }


def _lens(loaded: LoadedModel, vocab: tuple[list[str], np.ndarray]) -> LensData:
    adapter = loaded.adapter
    weight = adapter.unembedding.detach()
    dtype = np.float16 if weight.dtype == torch.float16 else np.float32
    norm = adapter.norm_spec()
    return LensData(
        unembedding=weight.float().cpu().numpy().astype(dtype),
        norm_kind=norm.kind,
        norm_eps=norm.eps,
        norm_weight=norm.weight,
        norm_bias=norm.bias,
        vocab_text=vocab[0],
        vocab_special=vocab[1],
    )


def _store_spec(
    config: ExtractConfig,
    loaded: LoadedModel,
    data: DataSet,
    plan: list[Sample],
    vocab,
    final_norm: FinalNormCheck,
    captures: tuple[CaptureArray, ...] = (),
) -> StoreSpec:
    adapter = loaded.adapter
    shape = adapter.attention_shape
    n_states = len(adapter.layers) + 1
    layout = schema.Layout(
        n_samples=len(plan),
        n_layers=n_states,
        n_tokens=max(s.n_tokens for s in plan),
        d_model=int(adapter.text_config.hidden_size),
        n_heads=shape.n_heads,
        n_query=query_capacity(plan, config.attention),
        vocab=int(adapter.unembedding.shape[0]),
        n_images=len(data.records),
        n_captions=max([len(r.captions) for r in data.records] + [1]),
        block=config.block,
        layers=parse_layers(config.layers, n_states) if config.layers else None,
        keep_hidden="hidden" in config.keep,
        keep_attention="attention" in config.keep,
        stats=tuple(c for c in COMPUTE if c in config.compute),
        lens_k=config.lens_topk if "lens" in config.compute else 0,
        captures=captures,
    )
    strings = lambda values: np.asarray(values, dtype=np.dtypes.StringDType())  # noqa: E731
    plan_arrays = {
        "image_id": strings([s.record.id for s in plan]),
        "prompt_kind": strings([s.prompt.kind for s in plan]),
        "prompt_id": strings([s.prompt.id for s in plan]),
        "prompt_text": strings([s.prompt.text for s in plan]),
        "image_index": np.array([s.image_index for s in plan], dtype=np.int32),
    }
    args = config.content_args()
    attrs = {
        "vislens_version": vislens.__version__,
        "model": model_attrs(loaded),
        "extraction": {
            "args": args,
            "device": config.resolved_device(),
            "batch_size": config.batch_size,
            **runtime.settings(),
        },
        "dataset": data.provenance(),
        "prompts": {
            "kinds": list(dict.fromkeys(config.prompts)),
            "file": config.prompts_file or "vislens:prompts_normal.json",
            "custom": config.prompt,
            "all_prompts": config.all_prompts,
            "noise_seed": config.noise_seed,
            "noisy_file": config.noisy_prompts_file,
        },
        "attention_mode": config.attention,
        "keep": list(config.keep) or ["none"],
        "computed": list(layout.stats),
        "captured": [a.point for a in captures],
        "layers_kept": list(layout.hidden_layers),
        "keep_bits": config.keep_bits,
        "n_samples": len(plan),
    }
    layer_attrs = {
        "long_name": "layer l: 0 = input embeddings (image features in place), l = output of decoder layer l (1 .. L)",
        "final_norm_applied_to_last": int(final_norm.applied),
        "final_norm_check": final_norm.describe(),
        "note": "the logit lens applies the final norm to layers 0 .. L-1, and to layer L only when "
        "final_norm_applied_to_last is 0",
    }
    captions = CaptionData(
        [r.id for r in data.records], [r.captions for r in data.records], [r.image for r in data.records]
    )
    return StoreSpec(
        layout=layout,
        attrs=attrs,
        fingerprint=fingerprint(args, [s.row() for s in plan]),
        plan=plan_arrays,
        captions=captions,
        lens=_lens(loaded, vocab),
        layer_attrs=layer_attrs,
        clevel=config.clevel,
        stat_attrs={
            "lens": {
                "final_norm_applied_to_last": int(final_norm.applied),
                "rows": "all tokens" if config.lens_all_tokens else "image tokens",
            },
            "cosine": {"text_tokens": list(schema.TEXT_TOKENS)},
        },
    )


def _query_positions(modality: torch.Tensor, n_tokens: torch.Tensor, mode: str, capacity: int) -> torch.Tensor:
    out = torch.full((modality.shape[0], capacity), -1, dtype=torch.long)
    for b in range(modality.shape[0]):
        n = int(n_tokens[b])
        if mode == "last":
            rows = torch.tensor([n - 1])
        elif mode == "all":
            rows = torch.arange(n)
        else:
            rows = torch.nonzero(modality[b, :n] == schema.TEXT).flatten()
        out[b, : len(rows)] = rows[:capacity]
    return out


@dataclass
class Encoded:
    """A batch through the processor, checked against the plan."""

    inputs: dict[str, Any]
    modality: torch.Tensor  # (batch, token) uint8
    n_tokens: torch.Tensor  # (batch,)


def _encode(adapter: Any, batch: list[Sample], images: list) -> Encoded:
    inputs = adapter.encode(images, [s.text for s in batch])
    mask = inputs["attention_mask"].bool()
    image_mask = adapter.image_mask(inputs) & mask
    n_tokens = mask.sum(1)
    for b, sample in enumerate(batch):
        n = int(n_tokens[b])
        if not bool(mask[b, :n].all()):
            raise ModelError(
                "the processor padded on the left; vislens needs right padding (tokenizer.padding_side='right')"
            )
        if n != sample.n_tokens or int(image_mask[b].sum()) != sample.n_image_tokens:
            raise ModelError(
                f"sample {sample.index} ({sample.record.id}) has {n} tokens ({int(image_mask[b].sum())} image) "
                f"but the plan counted {sample.n_tokens} ({sample.n_image_tokens} image); the processor is not deterministic"
            )
    expected = adapter.expected_image_tokens(inputs)
    if expected is not None:
        found = image_mask.sum(1).tolist()
        if found != expected:
            raise ModelError(
                f"image placeholders {found} do not match the image features {expected}; the prompt or processor is wrong"
            )
    modality = torch.where(image_mask, schema.IMAGE, torch.where(mask, schema.TEXT, schema.PADDING)).to(torch.uint8)
    return Encoded(inputs, modality, n_tokens)


def _on(device: str, inputs: dict[str, Any]) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _probe(
    loaded: LoadedModel, config: ExtractConfig, plan: list[Sample], n_tokens: int
) -> tuple[FinalNormCheck, tuple[CaptureArray, ...]]:
    """Run the first sample whose image reads: measure whether h_L carries the final norm, and the
    shapes of the ``--capture`` arrays."""
    adapter = loaded.adapter
    first_error: ImageError | None = None
    points = tuple(p for p in config.capture if p != "residual")
    for sample in plan:
        try:
            image = load_image(sample.record.image)
        except ImageError as exc:
            first_error = first_error or exc
            if config.strict:
                raise
            continue
        encoded = _encode(adapter, [sample], [image])
        with torch.inference_mode(), capture_modules(adapter, points) as captured:
            outputs = adapter.forward(_on(config.resolved_device(), encoded.inputs))
        valid = encoded.inputs["attention_mask"].bool().to(config.resolved_device())
        tensors = stacked(captured, 1, adapter.family)
        return check_final_norm(adapter, outputs, valid), describe(adapter, tensors, points, sample.n_tokens, n_tokens)
    log.warning("no image could be read (first: %s); every sample will be skipped", first_error)
    return FinalNormCheck(True, float("nan"), float("nan")), ()


@dataclass
class RunContext:
    """What every batch of one extraction needs beyond the model: the store's layout and the lens."""

    layout: schema.Layout
    normed_last: bool
    lens_all_tokens: bool = False
    unembedding: Any = None  # prepared for `vislens.kernels.lens_topk` once per run

    @property
    def q_capacity(self) -> int:
        return self.layout.n_query


def _cosine_stats(h: torch.Tensor, modality: np.ndarray, roles: np.ndarray) -> np.ndarray:
    """(L + 1, text sets, 3) cosine statistics of one sample's fp16 states ``h`` (L + 1, n, d) on its device."""
    from vislens.kernels.sample_stats import cosine_stats

    image = torch.from_numpy(modality == schema.IMAGE).to(h.device)
    sets = {
        "instruction": roles == schema.ROLE_INSTRUCTION,
        "all": modality == schema.TEXT,
        "template": roles == schema.ROLE_TEMPLATE,
    }
    out = [cosine_stats(h, image, torch.from_numpy(sets[name]).to(h.device)) for name in schema.TEXT_TOKENS]
    return torch.stack(out, dim=1).float().cpu().numpy()


def _lens_stats(
    adapter: Any, context: RunContext, h: torch.Tensor, modality: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k ids and logits (L + 1, n, k) of one sample's fp16 states ``h`` (L + 1, n, d); -1/NaN
    at the tokens not decoded (all but the image tokens, unless ``lens_all_tokens``)."""
    from vislens.kernels import lens_topk

    k = context.layout.lens_k
    n_states, n = h.shape[:2]
    rows = np.arange(n) if context.lens_all_tokens else np.flatnonzero(modality == schema.IMAGE)
    ids = np.full((n_states, n, k), -1, dtype=np.int32)
    values = np.full((n_states, n, k), np.nan, dtype=np.float32)
    if rows.size == 0:
        return ids, values
    x = h[:, torch.from_numpy(rows).to(h.device)]
    normed = n_states - 1 if context.normed_last else n_states
    norm = adapter.norm_spec()
    parts = [lens_topk(x[:normed], context.unembedding, k, norm=norm)]
    if normed < n_states:
        parts.append(lens_topk(x[normed:], context.unembedding, k, norm=None))
    top_values = torch.cat([p[0] for p in parts]).cpu().numpy()
    top_ids = torch.cat([p[1] for p in parts]).cpu().numpy()
    ids[:, rows] = top_ids
    values[:, rows] = top_values
    return ids, values


def _run_batch(
    loaded: LoadedModel, config: ExtractConfig, batch: list[Sample], images: list, context: RunContext
) -> list[dict[str, np.ndarray]]:
    adapter = loaded.adapter
    layout = context.layout
    device = config.resolved_device()
    encoded = _encode(adapter, batch, images)
    inputs, modality, n_tokens = encoded.inputs, encoded.modality, encoded.n_tokens
    q_capacity = context.q_capacity
    qpos = _query_positions(modality, n_tokens, config.attention, q_capacity) if q_capacity else None
    inputs = _on(device, inputs)
    points = tuple(a.point for a in layout.captures)
    with torch.inference_mode(), capture_modules(adapter, tuple(dict.fromkeys(points))) as captured:
        if qpos is not None:
            with capture_attention(adapter, qpos) as capture:
                outputs = adapter.forward(inputs)
        else:
            capture, outputs = None, adapter.forward(inputs)
        modules = {k: HostBatch(v) for k, v in stacked(captured, len(batch), adapter.family).items()}
        states = torch.stack(adapter.hidden_states(outputs), dim=0).to(torch.float16)  # (L + 1, B, N, D), on device
        kept = torch.tensor(layout.hidden_layers, device=states.device)
        hidden = HostBatch(states.index_select(0, kept)) if layout.keep_hidden else None
        if capture is not None:
            layers = sorted(capture.weights)
            weights = torch.stack([capture.weights[i] for i in layers], dim=1)  # (B, L, H, Q, N)
            gram = torch.stack([capture.gram[i] for i in layers], dim=1).float()  # (B, L, N, H, H)
            attention_kept = torch.tensor([layer - 1 for layer in layout.attention_layers], device=weights.device)
            if layout.attention:  # on their way to host memory while the statistics run
                kept_weights = HostBatch(weights.index_select(1, attention_kept))
                kept_gram = HostBatch(gram.index_select(1, attention_kept))
    ids = inputs["input_ids"].cpu()
    results = []
    for b, sample in enumerate(batch):
        n = int(n_tokens[b])
        sample_modality = modality[b, :n].numpy()
        roles = adapter.token_roles(
            ids[b, :n].numpy(), sample_modality == schema.IMAGE, sample.text, sample.prompt.text
        )
        arrays = {
            "token_id": ids[b, :n].numpy().astype(np.int32),
            "modality": sample_modality,
            "token_role": roles,
            "n_tokens": np.int32(n),
            "image_grid": np.asarray(adapter.image_grid(inputs, b), dtype=np.int32),
        }
        if hidden is not None:
            arrays["hidden"] = hidden.slice(slice(None), b, slice(0, n))  # read by the writer thread
        for array in layout.captures:  # cut to the sample's own tokens (padding is added back as 0)
            index = [slice(0, n) if d == "token" else slice(None) for d in array.dims]
            arrays[array.name] = modules[array.name].slice(b, *index)
        with torch.inference_mode():
            if "cosine" in layout.stats:
                arrays["cosine"] = _cosine_stats(states[:, b, :n], sample_modality, roles)
            if "lens" in layout.stats:
                arrays["logit_lens_topk"], arrays["logit_lens_topk_values"] = _lens_stats(
                    adapter, context, states[:, b, :n], sample_modality
                )
            if capture is not None:
                q = int((qpos[b] >= 0).sum())
                if "norm-attention" in layout.stats:
                    arrays.update(
                        _attention_stats(weights[b, :, :, :q, :n], gram[b, :, :n], qpos[b, :q], sample_modality)
                    )
                if layout.attention:
                    arrays["attn"] = kept_weights.slice(b, slice(None), slice(None), slice(0, q), slice(0, n))
                    arrays["value_gram"] = kept_gram.slice(b, slice(None), slice(0, n))
                    arrays["query_pos"] = qpos[b, :q].numpy().astype(np.int32)
        results.append(arrays)
    return results


def _attention_stats(
    weights: torch.Tensor, gram: torch.Tensor, positions: torch.Tensor, modality: np.ndarray
) -> dict[str, np.ndarray]:
    """Image shares and the last query's row of norm-based attention, on the model's device."""
    from vislens.kernels import norm_attention
    from vislens.kernels.sample_stats import attention_shares

    _, summed = norm_attention(weights, gram)  # (L, q, n)
    image = torch.from_numpy(modality == schema.IMAGE)
    text_rows = torch.from_numpy(modality[positions.numpy()] == schema.TEXT)
    share, after, last = attention_shares(summed.cpu(), positions, image, text_rows)
    return {"image_share": share.numpy(), "image_share_after_image": after.numpy(), "last_query": last.numpy()}


def _load_images(batch: list[Sample]) -> list[Image.Image | ImageError]:
    """Decode a batch's images; an unreadable one is returned as its error."""
    out: list[Image.Image | ImageError] = []
    for sample in batch:
        try:
            out.append(load_image(sample.record.image))
        except ImageError as exc:
            out.append(exc)
    return out


DEFAULT_BATCH_SIZE = 4


def plan_batches(owned: np.ndarray, pending: set[int], block: int, size: int) -> list[list[int]]:
    """The batches of a run: runs of ``size`` consecutive samples from the start of each block
    (whole blocks belong to one writer), kept where one of their samples is pending.

    Every run, resumed or sharded differently, so feeds the model the same batches, padding
    included, as an uninterrupted run: the model's CPU forward rounds by the batch's shape, and a
    resumed store must equal an uninterrupted one bit for bit. A batch's done samples are
    computed again (at most one partly written batch per killed writer) but not written."""
    batches: list[list[int]] = []
    for first in range(0, len(owned)):
        sample = int(owned[first])
        if (sample % block) % size == 0 or first == 0 or int(owned[first - 1]) != sample - 1:
            batches.append([])
        batches[-1].append(sample)
    return [b for b in batches if pending.intersection(b)]


def _recorded_run(location: Any, overwrite: bool) -> dict[str, Any]:
    """What an existing store records of the run that wrote it (empty for a new store or with
    ``overwrite``): its batch size and threads, for a resume to reproduce."""
    if overwrite:
        return {}
    try:
        root = location.read_json("zarr.json")
    except Exception:  # not a store, unreadable: prepare_store says so properly later
        return {}
    extraction = ((root or {}).get("attributes") or {}).get("extraction")
    return extraction if isinstance(extraction, dict) else {}


def _pinned(config: ExtractConfig, recorded: dict[str, Any]) -> ExtractConfig:
    """``config`` with its batch size and threads settled (`runtime.pin`; the threads are applied)."""
    batch, threads = runtime.pin(config.batch_size, config.threads, recorded, DEFAULT_BATCH_SIZE)
    return replace(config, batch_size=batch, threads=threads)


def extract(config: ExtractConfig, *, loaded: LoadedModel | None = None) -> ExtractResult:
    """Run (or resume) an extraction into ``config.out``.

    Raises
    ------
    ImageError
        With ``strict``, on the first missing or undecodable image (finished samples stay).
    StoreMismatchError, StoreExistsError, DiskFullError, ModelError, DataError
        See their messages for the fix.
    """
    start = time.perf_counter()
    location = as_location(config.out, config.storage_options)
    config = _pinned(config, _recorded_run(location, config.overwrite))
    data = load_data(config.data, limit=config.limit, seed=config.seed, images=config.images, split=config.split)
    if loaded is None:
        loaded = load_adapter(
            config.model, device=config.resolved_device(), dtype=config.dtype, revision=config.revision
        )
    vocab = loaded.adapter.vocabulary()
    plan = make_plan(data, config, loaded.adapter, vocab)
    final_norm, captures = _probe(loaded, config, plan, max(s.n_tokens for s in plan))
    spec = _store_spec(config, loaded, data, plan, vocab, final_norm, captures)
    context = RunContext(spec.layout, final_norm.applied, config.lens_all_tokens)
    if "lens" in spec.layout.stats:
        from vislens.kernels import prepare_unembedding

        context.unembedding = prepare_unembedding(loaded.adapter.unembedding.detach())
    writer = prepare_store(
        location,
        spec,
        overwrite=config.overwrite,
        creator=config.shard[0] == 0,
        wait_s=config.wait_s,
        shard=config.shard,
        writer_id=config.writer_id,
    )
    todo = writer.pending(config.shard)
    owned = shard_blocks(len(plan), spec.layout.block, config.shard)
    result = ExtractResult(location.url, len(plan), already_done=len(owned) - len(todo))
    background = PipelinedWriter(writer)
    pending = set(todo.tolist())
    batches = [[plan[i] for i in batch] for batch in plan_batches(owned, pending, spec.layout.block, config.batch_size)]
    loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vislens-images")
    try:
        upcoming = loader.submit(_load_images, batches[0]) if batches else None
        with tqdm(total=len(todo), desc="extract", unit="sample", disable=not config.progress) as bar:
            for number, batch in enumerate(batches):
                loaded_images = upcoming.result()
                if number + 1 < len(batches):  # decode the next batch while the model runs this one
                    upcoming = loader.submit(_load_images, batches[number + 1])
                ready, images = [], []
                for sample, image in zip(batch, loaded_images, strict=True):
                    if isinstance(image, ImageError):
                        if config.strict and sample.index in pending:
                            raise image
                        if sample.index in pending:
                            result.skipped[sample.record.id] = str(image)
                            background.mark_skipped(sample.index)
                    else:
                        ready.append(sample)
                        images.append(image)
                if ready:
                    for sample, arrays in zip(ready, _run_batch(loaded, config, ready, images, context)):
                        if sample.index in pending:  # the batch's done samples ran again only to keep it whole
                            background.write_sample(sample.index, arrays)
                            result.written += 1
                bar.update(sum(s.index in pending for s in batch))
    except BaseException:
        background.close(quiet=True)  # the first error is the one to report
        raise
    finally:
        loader.shutdown(wait=True, cancel_futures=True)
    background.close()
    result.seconds = time.perf_counter() - start
    if result.skipped:
        log.warning("%d samples skipped for unreadable images", len(result.skipped))
    return result

"""The ablation loop: plan the pairs, prepare the store, compute the pairs not yet done, write them.

A pair's arrays are written before its ``done`` flag, so an interrupted run resumes where it
stopped when the same command is run again. Prompts of one image share one prefix pass when
their text before the image is the same (LLaVA's template puts the image first).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import vislens
from vislens import runtime
from vislens.ablate.config import N_DEFAULT_PROMPTS, AblateConfig
from vislens.ablate.engine import PairInput, Work, run_prefix, shared_prefix_losses
from vislens.ablate.inputs import PlannedPair, encode_pairs, plan_pairs, token_arrays
from vislens.ablate.naive import naive_losses
from vislens.ablate.settings import Settings, masking_settings, tile_intervals, truncation_settings
from vislens.errors import ImageError
from vislens.extract.adapters import LoadedModel, load_adapter
from vislens.extract.config import fingerprint
from vislens.extract.datasets import DataSet, load_data
from vislens.extract.images import load_image
from vislens.extract.prompts import Prompt, normal_prompts
from vislens.extract.run import model_attrs
from vislens.store.ablation import AblationLayout, AblationSpec, AblationWriter, prepare_ablation
from vislens.store.create import CaptionData
from vislens.store.location import as_location

log = logging.getLogger("vislens.ablate")

DEFINITIONS = {
    "input": "the prompt in the model's chat template, a space, then the reference caption; nothing after it",
    "loss": "mean cross-entropy of the caption tokens (teacher forcing), image and prompt as context",
    "truncate": "keep the first k image tokens, drop the rest; the text after the image shifts down",
    "remove": "masked image tokens are taken out of the input; later positions shift down",
    "block": "masked image tokens stay in place but no later position attends to them; positions unchanged",
    "variable": "where images give different numbers of image tokens, settings are those of the largest n "
    "(n_image_tokens attribute); a setting beyond an input's own n (variable n_image_tokens) is NaN",
}


@dataclass
class AblateResult:
    """What one ablation run did."""

    store: str
    group: str
    n_pairs: int
    n_settings: int
    written: int = 0
    already_done: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    work: Work = field(default_factory=Work)

    def summary(self) -> str:
        """One paragraph for the terminal."""
        text = (
            f"{self.store} [{self.group}]: {self.written} (image, prompt) pairs x {self.n_settings} settings "
            f"in {self.seconds:.1f} s, {self.already_done} already done, {len(self.skipped)} images skipped, "
            f"of {self.n_pairs} pairs; the decoder processed {self.work.tokens} token positions"
        )
        for image, reason in list(self.skipped.items())[:20]:
            text += f"\n  skipped {image}: {reason}"
        return text


def load_prompts(prompts_file: str | None) -> list[Prompt]:
    """The prompts of a file, or the first five of the shipped normal prompts."""
    if prompts_file:
        return normal_prompts(prompts_file)
    return normal_prompts()[:N_DEFAULT_PROMPTS]


def make_settings(config: AblateConfig, n_image: int) -> Settings:
    """The run's settings for inputs of ``n_image`` image tokens."""
    if config.mode == "truncate":
        return truncation_settings(n_image, config.ks)
    intervals = config.intervals
    if config.interval_width is not None:
        intervals = tile_intervals(n_image, config.interval_width)
    return masking_settings(n_image, intervals, config.mask_style)


def _spec(
    config: AblateConfig,
    loaded: LoadedModel,
    data: DataSet,
    prompts: list[Prompt],
    pairs: list[PlannedPair],
    settings: Settings,
) -> AblationSpec:
    args = config.content_args()
    layout = AblationLayout(
        mode=config.mode,
        n_samples=len(data.records),
        n_prompts=len(prompts),
        n_tokens=max(p.n_tokens for p in pairs),
        n_caption_tokens=max(p.n_caption for p in pairs),
        n_image_tokens=settings.n_image,
        start=settings.start,
        stop=settings.stop,
        token_loss=config.token_loss,
        block=config.block,
    )
    provenance = {
        "model": model_attrs(loaded),
        "dataset": data.provenance(),
        "prompts": {"file": config.prompts_file or f"vislens:prompts_normal.json (first {N_DEFAULT_PROMPTS})"},
    }
    run = {
        "device": config.resolved_device(),
        "batch_size": config.batch_size,
        "method": config.method,
        **runtime.settings(),
    }
    rows = [(p.record.id, p.record.image, p.caption, prompts[p.prompt].id, prompts[p.prompt].text) for p in pairs]
    by_sample = {p.sample: p.caption for p in pairs}
    return AblationSpec(
        layout=layout,
        fingerprint=fingerprint(args, rows),
        args=args,
        attrs={
            "vislens_version": vislens.__version__,
            **provenance,
            "ablation": run,
            **({"mask_style": settings.style} if settings.mode == "mask" else {}),
            "caption_index": config.caption_index,
            "definitions": DEFINITIONS,
        },
        image_id=[r.id for r in data.records],
        image_index=np.arange(len(data.records), dtype=np.int32),
        caption=[by_sample[s] for s in range(len(data.records))],
        prompt_id=[p.id for p in prompts],
        prompt_text=[p.text for p in prompts],
        captions=CaptionData(
            [r.id for r in data.records], [r.captions for r in data.records], [r.image for r in data.records]
        ),
        root_attrs={"vislens_version": vislens.__version__, **provenance, "ablation": {"args": args, **run}},
    )


def _pair_arrays(
    pair: PairInput, token_loss: np.ndarray, fits: np.ndarray, settings: Settings, config: AblateConfig
) -> dict:
    """The stored arrays of one pair; ``token_loss`` holds the settings that ``fits``, then the unablated input."""
    name = "loss" if settings.mode == "truncate" else "masked_loss"
    per_setting = np.full((len(settings), token_loss.shape[1]), np.nan, dtype=np.float32)
    per_setting[fits] = token_loss[:-1]
    arrays: dict[str, Any] = {
        name: per_setting.mean(axis=1),
        "full_loss": np.float32(token_loss[-1].mean()),
        "full_token_loss": token_loss[-1],
        "n_tokens": np.int32(pair.n_tokens),
        "n_image_tokens": np.int32(pair.n_image),
        **token_arrays(pair),
    }
    if config.token_loss is not None:
        arrays["token_loss"] = per_setting.astype(config.token_loss)
    return arrays


def _run_image(
    loaded: LoadedModel,
    config: AblateConfig,
    settings: Settings,
    image: Any,
    todo: list[PlannedPair],
    writer: AblationWriter,
    work: Work,
    bar: Any,
) -> None:
    adapter = loaded.adapter
    with torch.inference_mode():
        inputs = encode_pairs(adapter, image, todo, config.resolved_device())
        prefixes: dict[bytes, tuple[torch.Tensor, list]] = {}  # prefix token ids -> (its embeddings, its cache)
        for planned, pair in zip(todo, inputs):
            fits, start, stop = settings.for_input(pair.n_image)
            start = np.append(start, pair.n_image)  # last row: nothing removed (the full loss)
            stop = np.append(stop, pair.n_image)
            options = dict(shift=settings.shift, batch_size=config.batch_size, work=work)
            if config.method == "naive":
                losses = naive_losses(adapter, pair, start, stop, **options)
            else:
                # prompts share a prefix only if its embeddings are equal too: InstructBLIP's image
                # features depend on the prompt (its Q-Former reads it), its placeholder ids do not
                key, embeds = pair.token_ids[: pair.prefix_len].tobytes(), pair.embeds[: pair.prefix_len]
                if key not in prefixes or not torch.equal(prefixes[key][0], embeds):
                    prefixes[key] = (embeds, run_prefix(adapter, pair, work))
                losses = shared_prefix_losses(adapter, pair, start, stop, prefix=prefixes[key][1], **options)
            writer.write_pair(planned.sample, planned.prompt, _pair_arrays(pair, losses, fits, settings, config))
            bar.update(1)


DEFAULT_BATCH_SIZE = 16


def _recorded_run(location: Any, config: AblateConfig) -> dict[str, Any]:
    """What an existing ablation group records of the run that wrote it (batch size, threads), for
    a resume to reproduce; empty for a new group or with ``overwrite``."""
    if config.overwrite:
        return {}
    try:
        group = location.read_json(config.group, "zarr.json")
    except Exception:  # not a store, unreadable: prepare_ablation says so properly later
        return {}
    run = ((group or {}).get("attributes") or {}).get("ablation")
    return run if isinstance(run, dict) else {}


def ablate(config: AblateConfig, *, loaded: LoadedModel | None = None) -> AblateResult:
    """Run (or resume) an ablation into ``config.out`` (group ``config.group``).

    Raises
    ------
    StoreMismatchError
        When the group holds an ablation with other arguments (and not ``overwrite``).
    ImageError
        With ``strict``, on the first unreadable image (finished pairs stay).
    DataError, ModelError, ConfigError, StoreExistsError
        See their messages for the fix.
    """
    begin = time.perf_counter()
    location = as_location(config.out, config.storage_options)
    batch, threads = runtime.pin(config.batch_size, config.threads, _recorded_run(location, config), DEFAULT_BATCH_SIZE)
    config = replace(config, batch_size=batch, threads=threads)
    data = load_data(config.data, limit=config.limit, seed=config.seed, images=config.images, split=config.split)
    prompts = load_prompts(config.prompts_file)
    if loaded is None:
        loaded = load_adapter(
            config.model, device=config.resolved_device(), dtype=config.dtype, revision=config.revision
        )
    pairs = plan_pairs(data, prompts, loaded.adapter, config.caption_index)
    settings = make_settings(config, max(p.n_image for p in pairs))
    writer = prepare_ablation(
        location,
        _spec(config, loaded, data, prompts, pairs, settings),
        group=config.group,
        overwrite=config.overwrite,
        creator=config.shard[0] == 0,
        wait_s=config.wait_s,
        shard=config.shard,
        writer_id=config.writer_id,
    )
    try:
        return _ablate_pairs(config, loaded, data, pairs, settings, writer, begin)
    finally:
        writer.close()  # releases the writer's claim


def _ablate_pairs(
    config: AblateConfig,
    loaded: LoadedModel,
    data: DataSet,
    pairs: list[PlannedPair],
    settings: Settings,
    writer: AblationWriter,
    begin: float,
) -> AblateResult:
    """Compute and write the pending pairs of ``config.shard``."""
    todo = writer.pending(config.shard)
    n_prompts = len(pairs) // len(data.records)
    owned = len(writer.owned(config.shard)) * n_prompts
    result = AblateResult(writer.location.url, config.group, owned, len(settings), already_done=owned - len(todo))
    by_sample: dict[int, list[PlannedPair]] = {}
    for s, p in todo:
        by_sample.setdefault(s, []).append(pairs[s * n_prompts + p])
    with tqdm(total=len(todo), desc=f"ablate ({config.mode})", unit="pair", disable=not config.progress) as bar:
        for sample, planned in by_sample.items():
            record = data.records[sample]
            try:
                image = load_image(record.image)
            except ImageError as exc:
                if config.strict:
                    raise
                result.skipped[record.id] = str(exc)
                for pair in planned:
                    writer.mark_skipped(pair.sample, pair.prompt)
                bar.update(len(planned))
                continue
            _run_image(loaded, config, settings, image, planned, writer, result.work, bar)
            result.written += len(planned)
    result.seconds = time.perf_counter() - begin
    if result.skipped:
        log.warning("%d images skipped as unreadable", len(result.skipped))
    return result

"""Training the toy VLLMs from scratch on the shapes world, on the CPU, fully seeded.

`train_toy` builds a random-init toy (`vislens.toys.llava` or `vislens.toys.instructblip`) and
trains it in stages, each a `Stage` that names what it trains and on what:

1. ``text``: text-only pretraining of the decoder (language model and unembedding): the chat
   template, an instruction and a caption, next-token loss on every token. Where the image goes
   the text holds the scene written out (``Stage.slot``: ``"scene"`` = each shape's colour, kind
   and position in reading order, e.g. ``red circle top left blue square bottom``), so that the
   decoder learns to read a description of the scene from the image's place and caption it.
2. ``vision``: the vision tower alone, through a discarded probe that names each patch's grid
   cell content (InstructBLIP: and its place); InstructBLIP then ``queries``: the Q-Former's
   query j names cell j's content (a stand-in for a pretrained CLIP and Q-Former).
3. ``align``: the projector (LLaVA's MLP; InstructBLIP's Q-Former, query tokens and language
   projection), vision tower and decoder frozen; loss on the caption tokens only.
4. ``joint``: projector and decoder, loss on the caption tokens only.

No objective is added at the image tokens: their hidden states are never a target. What the
logit lens reads from them comes from the staging (see docs/toy-model.md, which also records
what was tried and failed).

Prompts are drawn as extraction draws them: the study's ten normal prompts, noisy strings from
the vocabulary (`vislens.extract.prompts.noisy_prompt`, another seed) and the empty prompt, each
formatted by the family's adapter, so that training sees exactly the token layout that
extraction and ablation feed the model (checked against the real processor at start).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vislens.errors import ConfigError
from vislens.toys.shapes import COLOURS, SHAPES, SHAPES_VERSION, Scene, captions, render, scene

log = logging.getLogger("vislens.toys")

TRAINED_VERSION = 1
"""Bumped whenever training changes what it writes."""
NOISE_SEED = 1000
"""Seed of the noisy prompts seen in training (extraction's default is 0: different strings)."""


@dataclass(frozen=True)
class Stage:
    """One stage of training.

    ``train``: the parts that learn (``vision``, ``projector``, ``decoder``). ``loss``:

    - ``"all"``: every next token; ``"caption"``: the caption and its end only;
    - ``"cells"``: the vision tower names, from each patch, the colour and kind of the shape in
      the patch's grid cell; ``"cells-where"``: also which of the 9 cells the patch lies in;
    - ``"query-cells"``: the Q-Former names, from query j's output, the content of cell j (j < 9).

    The cells losses read through a linear probe that is discarded after the stage. ``images``:
    whether the model sees images (else the text holds ``slot`` where the image goes).
    """

    name: str
    steps: int
    lr: float
    train: tuple[str, ...]
    loss: str = "caption"
    images: bool = True
    slot: str = "scene"


def default_stages(family: str) -> tuple[Stage, ...]:
    """The staging the shipped toys were trained with."""
    text = Stage("text", 600, 3e-3, ("decoder",), loss="all", images=False)
    if family == "llava":
        return (
            text,
            Stage("vision", 300, 2e-3, ("vision",), loss="cells"),
            Stage("align", 400, 2e-3, ("projector",)),
            Stage("joint", 600, 2e-3, ("projector", "decoder")),
        )
    return (  # the Q-Former must find the cells: the patches keep where they are, the queries learn to look
        text,
        Stage("vision", 300, 2e-3, ("vision",), loss="cells-where"),
        Stage("queries", 600, 3e-3, ("projector",), loss="query-cells"),
        Stage("align", 600, 2e-3, ("projector",)),
        Stage("joint", 1200, 2e-3, ("projector", "decoder")),
    )


@dataclass(frozen=True)
class TrainConfig:
    """What `train_toy` does; the defaults made the shipped weights."""

    family: str = "llava"
    seed: int = 0
    n_train: int = 6000
    batch_size: int = 32
    stages: tuple[Stage, ...] = ()
    prompt_mix: tuple[float, float, float] = (0.7, 0.15, 0.15)
    """Probabilities of the normal, noisy and empty prompt kinds."""
    weight_decay: float = 0.01
    threads: int = 2
    eval_every_stage: bool = True
    eval_images: int = 32
    init_from: str | None = None
    """A checkpoint of the same architecture to start from instead of the random init."""

    def resolved_stages(self) -> tuple[Stage, ...]:
        """``stages``, or the defaults of the family."""
        return self.stages or default_stages(self.family)


@dataclass
class TrainReport:
    """What happened: per stage, its wall time, mean loss of its last 50 steps and evaluations."""

    family: str
    stages: list[dict[str, Any]] = field(default_factory=list)
    total_seconds: float = 0.0


def trained_spec(family: str, seed: int = 0) -> Any:
    """The architecture of the shipped trained toy of ``family`` (``llava`` or ``instructblip``)."""
    common = dict(
        layers=6, hidden=128, heads=4, kv_heads=2, intermediate=384, vocab=200, image_size=48, patch_size=8,
        vision_hidden=64, vision_layers=3, seed=seed,
    )  # fmt: skip
    if family == "llava":
        from vislens.toys.llava import ToySpec

        return ToySpec(**common)
    if family == "instructblip":
        from vislens.toys.instructblip import ToyInstructBlipSpec

        return ToyInstructBlipSpec(
            **common, qformer_hidden=64, qformer_layers=2, qformer_vocab=256, query_tokens=12, qformer_cross_every=1
        )
    raise ConfigError(f"no trained toy of family {family!r}; choose llava or instructblip")


def random_init_toy(family: str, seed: int = 0) -> tuple[Any, Any]:
    """The trained toy's architecture at random init (with random non-unit norms): (model, processor)."""
    spec = trained_spec(family, seed)
    if family == "llava":
        from vislens.toys.llava import toy_llava

        return toy_llava(spec)
    from vislens.toys.instructblip import toy_instructblip

    return toy_instructblip(spec)


def parts(model: torch.nn.Module, family: str) -> dict[str, list[torch.nn.Parameter]]:
    """The trainable parts of a toy: ``vision``, ``projector``, ``decoder`` -> parameters."""
    if family == "llava":
        inner = model.model
        return {
            "vision": list(inner.vision_tower.parameters()),
            "projector": list(inner.multi_modal_projector.parameters()),
            "decoder": list(inner.language_model.parameters()) + list(model.lm_head.parameters()),
        }
    return {
        "vision": list(model.vision_model.parameters()),
        "projector": [model.query_tokens, *model.qformer.parameters(), *model.language_projection.parameters()],
        "decoder": list(model.language_model.parameters()),
    }


def slot_text(drawn: Scene, slot: str) -> str:
    """What the text-only stage writes where the image goes."""
    if slot == "none":
        return ""
    if slot == "objects":
        return " ".join(f"{s.colour} {s.kind}" for s in drawn.shapes)
    if slot == "scene":
        return " ".join(f"{s.colour} {s.kind} {s.position}" for s in drawn.shapes)
    raise ConfigError(f"unknown slot {slot!r}; choose none, objects or scene")


class Batches:
    """Training batches of one toy: token ids, labels, pixels (and Q-Former ids) built like the processor's."""

    def __init__(self, adapter: Any, family: str, config: TrainConfig) -> None:
        from vislens.extract.prompts import normal_prompts

        self.adapter, self.family, self.config = adapter, family, config
        self.tok = adapter.tokenizer
        self.image_token = adapter.image_token_id
        self.placeholder = adapter.image_placeholder
        self.n_image = adapter.count_tokens(adapter.format_prompt(""), (48, 48))[1]
        self.scenes = [scene("train", i) for i in range(config.n_train)]
        self.captions = [captions(s) for s in self.scenes]
        processor = adapter.processor
        images = [render(s) for s in self.scenes]
        self.pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        self.normal = [p.text for p in normal_prompts()]
        self.vocab, self.special = adapter.vocabulary()
        self.qformer_tok = getattr(processor, "qformer_tokenizer", None)
        self._check_against_processor(images[0])

    # ---- one example ----
    def prompt(self, rng: np.random.Generator) -> str:
        """A prompt drawn from the mix of kinds."""
        from vislens.extract.prompts import noisy_prompt

        kind = rng.choice(3, p=self.config.prompt_mix)
        if kind == 0:
            return self.normal[int(rng.integers(len(self.normal)))]
        if kind == 1:
            return noisy_prompt(self.vocab, self.special, NOISE_SEED, int(rng.integers(1 << 30))).text
        return ""

    def _ids(self, text: str) -> list[int]:
        return self.tok(text)["input_ids"]

    def example(self, index: int, template: int, prompt: str, stage: Stage) -> tuple[list[int], list[int], str]:
        """(input ids, labels, context text for the Q-Former) of one training example."""
        context, full = self.adapter.ablation_texts(prompt, self.captions[index][template])
        eos = self.tok.eos_token_id
        if self.family == "llava":
            fill = self.placeholder * self.n_image if stage.images else slot_text(self.scenes[index], stage.slot)
            ctx = self._ids(context.replace(self.placeholder, fill))
            ids = self._ids(full.replace(self.placeholder, fill)) + [eos]
            prefix: list[int] = []
        else:
            if stage.images:
                prefix = [self.image_token] * self.n_image
            else:
                words = slot_text(self.scenes[index], stage.slot)
                prefix = self.tok(words, add_special_tokens=False)["input_ids"] if words else []
            ctx = prefix + self._ids(context) if context else prefix + self._ids("")
            ids = prefix + self._ids(full) + [eos]
        if ids[: len(ctx)] != ctx:
            raise ConfigError(f"the caption does not extend the context's tokens for {full!r}; fix the tokenizer")
        labels = list(ids)
        if stage.loss == "caption":
            labels[: len(ctx)] = [-100] * len(ctx)
        elif stage.images:
            labels = [-100 if i == self.image_token else i for i in labels]
        return ids, labels, context

    def cells(self, index: np.ndarray) -> dict[str, torch.Tensor]:
        """Pixels and per-cell labels (colour, kind; the last class = empty) of scenes ``index``."""
        colour = np.full((len(index), 9), len(COLOURS))
        kind = np.full((len(index), 9), len(SHAPES))
        for row, i in enumerate(index):
            for s in self.scenes[int(i)].shapes:
                colour[row, 3 * s.row + s.col] = list(COLOURS).index(s.colour)
                kind[row, 3 * s.row + s.col] = SHAPES.index(s.kind)
        return {
            "pixel_values": self.pixels[torch.from_numpy(index)],
            "colour": torch.from_numpy(colour),
            "kind": torch.from_numpy(kind),
        }

    def batch(self, rng: np.random.Generator, stage: Stage) -> dict[str, torch.Tensor]:
        """A random batch for ``stage``."""
        n = self.config.batch_size
        index = rng.integers(len(self.scenes), size=n)
        if stage.loss in ("cells", "cells-where", "query-cells"):
            out = self.cells(index)
            if stage.loss == "query-cells":
                contexts = [self.adapter.ablation_texts(self.prompt(rng), "x")[0] for _ in index]
                q = self.qformer_tok(contexts, return_tensors="pt", padding=True)
                out["qformer_input_ids"], out["qformer_attention_mask"] = q["input_ids"], q["attention_mask"]
            return out
        template = rng.integers(len(self.captions[0]), size=n)
        rows = [self.example(int(i), int(t), self.prompt(rng), stage) for i, t in zip(index, template, strict=True)]
        width = max(len(ids) for ids, _, _ in rows)
        pad = self.tok.pad_token_id
        out = {
            "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _, _ in rows]),
            "labels": torch.tensor([lab + [-100] * (width - len(lab)) for _, lab, _ in rows]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _, _ in rows]),
        }
        if stage.images:
            out["pixel_values"] = self.pixels[torch.from_numpy(index)]
            if self.qformer_tok is not None:
                q = self.qformer_tok([c for _, _, c in rows], return_tensors="pt", padding=True)
                out["qformer_input_ids"], out["qformer_attention_mask"] = q["input_ids"], q["attention_mask"]
        return out

    def _check_against_processor(self, image: Any) -> None:
        """The ids built here must equal the real processor's for the same prompt and caption."""
        stage = Stage("check", 1, 0.0, (), loss="caption", images=True)
        prompt = self.normal[0]
        ids, _, context = self.example(0, 0, prompt, stage)
        _, full = self.adapter.ablation_texts(prompt, self.captions[0][0])
        inputs = self.adapter.encode([image], [full])
        if inputs["input_ids"][0].tolist() != ids[:-1]:
            raise ConfigError("training ids differ from the processor's; the toy's tokenizer or template changed")
        if self.qformer_tok is not None:
            ctx = self.adapter.encode([image], [context])["qformer_input_ids"][0].tolist()
            if self.qformer_tok([context])["input_ids"][0] != ctx:
                raise ConfigError("training Q-Former ids differ from the processor's")


def vision_features(model: torch.nn.Module, family: str, pixel_values: torch.Tensor) -> torch.Tensor:
    """(batch, patch, width) what the connector reads from the vision tower (CLS dropped).

    LLaVA: the hidden states of ``vision_feature_layer``; InstructBLIP: the last, post-normed ones.
    """
    if family == "llava":
        layer = model.config.vision_feature_layer
        states = model.model.vision_tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        return states[layer][:, 1:]
    return model.vision_model(pixel_values=pixel_values).last_hidden_state[:, 1:]


def cell_head(model: torch.nn.Module, loss: str = "cells") -> torch.nn.Linear:
    """The linear probe of a cells stage: per grid cell, colour and kind logits (each with an 'empty' class).

    It reads the vision tower's patches (``cells``) or the Q-Former's query outputs (``query-cells``).
    """
    config = model.config.qformer_config if loss == "query-cells" else model.config.vision_config
    where = 9 if loss == "cells-where" else 0
    return torch.nn.Linear(config.hidden_size, len(COLOURS) + 1 + len(SHAPES) + 1 + where)


def _query_cell_loss(model: torch.nn.Module, head: torch.nn.Linear, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the colour and kind of grid cell j from the Q-Former's output of query j (j < 9).

    The other queries are free. Only the Q-Former's own output is probed (before the language
    projection), never the decoder's image tokens.
    """
    out = model.get_image_features(
        pixel_values=batch["pixel_values"],
        qformer_input_ids=batch["qformer_input_ids"],
        qformer_attention_mask=batch["qformer_attention_mask"],
        return_dict=True,
    )
    n_query = model.query_tokens.shape[1]
    queries = out.qformer_outputs[0][:, :n_query][:, :9]  # (batch, cell, width)
    logits = head(queries)
    n_colour = len(COLOURS) + 1
    ce = torch.nn.functional.cross_entropy
    return ce(logits[..., :n_colour].reshape(-1, n_colour), batch["colour"].reshape(-1)) + ce(
        logits[..., n_colour:].reshape(-1, len(SHAPES) + 1), batch["kind"].reshape(-1)
    )


def _cell_loss(
    model: torch.nn.Module, family: str, head: torch.nn.Linear, batch: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Cross-entropy of the colour and kind of the grid cell each patch lies in, from that patch's features."""
    feats = vision_features(model, family, batch["pixel_values"])  # (batch, patch, width)
    side = int(round(feats.shape[1] ** 0.5))
    cell = (torch.arange(side)[:, None] * 3 // side * 3 + torch.arange(side)[None, :] * 3 // side).reshape(-1)
    logits = head(feats)
    n_colour, n_kind = len(COLOURS) + 1, len(SHAPES) + 1
    ce = torch.nn.functional.cross_entropy
    loss = ce(logits[..., :n_colour].reshape(-1, n_colour), batch["colour"][:, cell].reshape(-1)) + ce(
        logits[..., n_colour : n_colour + n_kind].reshape(-1, n_kind), batch["kind"][:, cell].reshape(-1)
    )
    if logits.shape[-1] > n_colour + n_kind:  # cells-where: also which cell the patch lies in
        where = logits[..., n_colour + n_kind :]
        loss = loss + ce(where.reshape(-1, 9), cell.repeat(where.shape[0]))
    return loss


def _loss(model: torch.nn.Module, family: str, batch: dict[str, torch.Tensor], images: bool) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    # text only: LLaVA runs without pixels; InstructBLIP's decoder is called on its own
    lm = model if images or family == "llava" else model.language_model
    logits = lm(**inputs, use_cache=False).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )


def _warm_start(model: torch.nn.Module, checkpoint: Path) -> None:
    """Copy every weight of ``checkpoint`` whose name and shape match ``model``'s (the rest keep their init)."""
    from safetensors.torch import load_file

    own = model.state_dict()
    found = load_file(checkpoint / "model.safetensors")
    kept = {k: v for k, v in found.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(kept, strict=False)
    log.info("warm start from %s: %d of %d tensors", checkpoint, len(kept), len(own))


def _schedule(step: int, steps: int) -> float:
    """Linear warm-up over 5% of the steps, then cosine decay to 10%."""
    warm = max(1, steps // 20)
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _evaluate(model: torch.nn.Module, processor: Any, n: int) -> dict[str, Any]:
    from vislens.toys.evaluate import caption_f1, lens_scores

    f1, got = caption_f1(model, processor, n)
    lens = lens_scores(model, processor, n)
    model.train()
    return {
        "caption_f1": round(f1, 4),
        "example": got[0],
        "lens_recall": [round(float(v), 3) for v in lens.recall],
        "lens_precision": [round(float(v), 3) for v in lens.precision],
    }


def train_toy(out: str | Path | None, config: TrainConfig = TrainConfig()) -> tuple[Any, Any, TrainReport]:
    """Train a toy from scratch; save it to ``out`` (if given) with ``save_pretrained``.

    Returns (model, processor, report). Deterministic in ``config`` for a given torch build and
    thread count.
    """
    from vislens.extract.adapters import adapter_class

    start = time.perf_counter()
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    model, processor = random_init_toy(config.family, config.seed)
    if config.init_from is not None:
        _warm_start(model, Path(config.init_from))
    adapter = adapter_class(model.config.model_type)(model, processor)
    data = Batches(adapter, config.family, config)
    report = TrainReport(config.family)
    groups = parts(model, config.family)
    rng = np.random.default_rng([config.seed, 7])
    model.train()
    log.info("data ready in %.1f s", time.perf_counter() - start)
    for stage in config.resolved_stages():
        t0 = time.perf_counter()
        trainable = {id(p) for name in stage.train for p in groups[name]}
        params = [p for p in model.parameters() if id(p) in trainable]
        for p in model.parameters():
            p.requires_grad_(id(p) in trainable)
        probe = stage.loss in ("cells", "cells-where", "query-cells")
        head = cell_head(model, stage.loss) if probe else None  # discarded after the stage
        if head is not None:
            params += list(head.parameters())
        opt = torch.optim.AdamW(params, lr=stage.lr, weight_decay=config.weight_decay, betas=(0.9, 0.98))
        losses = []
        for step in range(stage.steps):
            for g in opt.param_groups:
                g["lr"] = stage.lr * _schedule(step, stage.steps)
            batch = data.batch(rng, stage)
            if stage.loss == "query-cells":
                loss = _query_cell_loss(model, head, batch)
            elif head is not None:  # cells, cells-where
                loss = _cell_loss(model, config.family, head, batch)
            else:
                loss = _loss(model, config.family, batch, stage.images)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.item())
            if step % 100 == 0 or step == stage.steps - 1:
                log.info(
                    "%s step %d/%d loss %.4f (%.0f s)",
                    stage.name,
                    step,
                    stage.steps,
                    np.mean(losses[-50:]),
                    time.perf_counter() - t0,
                )
        record: dict[str, Any] = {
            "stage": stage.name,
            "seconds": round(time.perf_counter() - t0, 1),
            "final_loss": round(float(np.mean(losses[-50:])), 4),
        }
        if config.eval_every_stage and stage.loss == "caption":
            record |= _evaluate(model, processor, config.eval_images)
        log.info("%s", record)
        report.stages.append(record)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    report.total_seconds = round(time.perf_counter() - start, 1)
    if out is not None:
        save_trained(model, processor, config, report, Path(out))
    return model, processor, report


def save_trained(model: Any, processor: Any, config: TrainConfig, report: TrainReport, out: Path) -> Path:
    """Write the checkpoint (safetensors, tokenizer, processor) and ``vislens_toy.json`` (how it was made)."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    record = {
        "family": config.family,
        "trained": True,
        "trained_version": TRAINED_VERSION,
        "shapes_version": SHAPES_VERSION,
        "spec": asdict(trained_spec(config.family, config.seed)),
        "config": asdict(config) | {"stages": [asdict(s) for s in config.resolved_stages()]},
        "report": asdict(report),
        "torch": torch.__version__,
    }
    (out / "vislens_toy.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


__all__ = [
    "Stage",
    "TrainConfig",
    "TrainReport",
    "default_stages",
    "random_init_toy",
    "save_trained",
    "train_toy",
    "trained_spec",
]

"""Analysis 4: how many image tokens the model needs (figures 4.6 and 4.7 of the study).

Works on the ``ablation`` group written by ``vislens ablate`` (an `xarray.Dataset`); only
(sample, prompt) pairs whose ``done`` flag is 1 count. Definitions, with L(k) the loss with the
first k image tokens averaged over samples, and L_p(k) the same for prompt p:

- curve: L_p(k) for every prompt p and k (figure 4.6).
- threshold: the study's line, the mean loss over all settings and prompts,
  ``mean_p mean_k L_p(k)`` (with every pair done, the mean of every stored loss).
- total reduction: ``L(k_min) - L_full``, where k_min is the smallest k of the run and L_full the
  mean loss with every image token (``full_loss``; equal to L(n) when n is in the run).
- reduction(k) = ``(L(k_min) - L(k)) / (L(k_min) - L_full)``: the share of the total reduction
  reached with k tokens; the ``target`` point (default 0.7, the study's 70%) is the SMALLEST k
  with reduction(k) >= target, reported as k and as the fraction ``k / n`` of the n image tokens.
  Pooled over prompts, L(k) is the mean of the L_p(k).
- masking: mean loss per masked token or interval, and its difference from the unmasked loss
  (figure 4.7; a negative difference: removing those tokens helps).

Where images give different numbers of image tokens (LLaVA-NeXT, Qwen2-VL, Idefics3), a setting
beyond an image's own n is NaN and left out of the means (``n_samples`` counts the images each
mean covers), and ``fraction`` is k over the largest n of the run (attribute ``n_image_tokens``).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import xarray as xr  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from vislens.analyze.common import StoreLike, group, label  # noqa: E402
from vislens.errors import StoreFormatError  # noqa: E402
from vislens.store import DONE  # noqa: E402

TARGET = 0.7
ALL = "all"


def ablation_group(store: StoreLike, name: str = "ablation") -> xr.Dataset:
    """The ablation group of a store (a Dataset passed in is taken to be that group)."""
    ds = group(store, name)
    if "mode" not in ds.attrs or "done" not in ds:
        raise StoreFormatError(f"group {name!r} is not an ablation group (written by `vislens ablate`)")
    return ds


def _done(ds: xr.Dataset, name: str) -> xr.DataArray:
    """``ds[name]`` (float64) with pairs that are not done set to NaN."""
    if name not in ds:
        raise StoreFormatError(
            f"the ablation group has no {name!r}: it was run with --mode {ds.attrs.get('mode')!r}; "
            "use the analysis of that mode"
        )
    done = ds["done"].load() == DONE
    if not bool(done.any()):
        raise StoreFormatError("the ablation group has no finished pairs yet; run (or resume) `vislens ablate`")
    return ds[name].astype("float64").where(done)


def _prompt_ids(ds: xr.Dataset) -> list[str]:
    if "prompt_id" in ds.coords:
        return [str(v) for v in ds["prompt_id"].values]
    return [str(v) for v in ds["prompt"].values]


def truncation_curve(ds: xr.Dataset) -> pd.DataFrame:
    """Mean loss per prompt and k: columns prompt_id, k, fraction (k / n), mean_loss, n_samples."""
    loss = _done(ds, "loss")
    mean = loss.mean("sample", skipna=True).values  # (prompt, k)
    count = loss.count("sample").values
    ks = ds["k"].values.astype(int)
    n = int(ds.attrs["n_image_tokens"])
    rows = [
        {"prompt_id": pid, "k": int(k), "fraction": k / n, "mean_loss": mean[p, j], "n_samples": int(count[p, j])}
        for p, pid in enumerate(_prompt_ids(ds))
        for j, k in enumerate(ks)
    ]
    return pd.DataFrame(rows)


def threshold(ds: xr.Dataset) -> float:
    """The study's threshold: mean over prompts and k of the mean loss over samples."""
    return float(np.nanmean(_done(ds, "loss").mean("sample", skipna=True).values))


def reduction_curve(ds: xr.Dataset) -> pd.DataFrame:
    """Share of the total loss reduction per k, pooled over prompts and per prompt.

    Columns: prompt_id (``all`` = pooled), k, fraction (k / n), mean_loss, reduction.
    """
    per_prompt = _done(ds, "loss").mean("sample", skipna=True)  # (prompt, k)
    full = _done(ds, "full_loss").mean("sample", skipna=True)  # (prompt,)
    curves = [(ALL, per_prompt.mean("prompt").values, float(full.mean("prompt")))]
    curves += [(pid, per_prompt.values[p], float(full.values[p])) for p, pid in enumerate(_prompt_ids(ds))]
    ks = ds["k"].values.astype(int)
    n = int(ds.attrs["n_image_tokens"])
    rows = []
    for pid, curve, full_loss in curves:
        total = curve[0] - full_loss
        reduction = (curve[0] - curve) / total if total > 0 else np.full(len(ks), np.nan)
        rows += [
            {"prompt_id": pid, "k": int(k), "fraction": k / n, "mean_loss": curve[j], "reduction": reduction[j]}
            for j, k in enumerate(ks)
        ]
    return pd.DataFrame(rows)


def tokens_for_reduction(ds: xr.Dataset, target: float = TARGET) -> pd.DataFrame:
    """The smallest k reaching ``target`` of the total loss reduction, pooled and per prompt.

    Columns: prompt_id, target, k_min, loss_k_min, loss_full, total_reduction, k, fraction
    (k / n); k and fraction are NaN when the loss does not fall or never reaches the target.
    """
    curve = reduction_curve(ds)
    n = int(ds.attrs["n_image_tokens"])
    full = _done(ds, "full_loss").mean("sample", skipna=True)
    fulls = {ALL: float(full.mean("prompt"))} | dict(zip(_prompt_ids(ds), full.values.astype(float)))
    rows = []
    for pid, part in curve.groupby("prompt_id", sort=False):
        reached = part[part["reduction"] >= target]
        k = float(reached["k"].iloc[0]) if len(reached) else np.nan
        first = part.iloc[0]
        rows.append(
            {
                "prompt_id": pid,
                "target": target,
                "k_min": int(first["k"]),
                "loss_k_min": float(first["mean_loss"]),
                "loss_full": fulls[pid],
                "total_reduction": float(first["mean_loss"]) - fulls[pid],
                "k": k,
                "fraction": k / n,
            }
        )
    return pd.DataFrame(rows)


def masking_table(ds: xr.Dataset) -> pd.DataFrame:
    """Mean masked loss per setting, per prompt and pooled (``all``).

    Columns: prompt_id, setting, start, stop, masked_loss, full_loss, delta (masked - full), n_samples.
    """
    masked = _done(ds, "masked_loss")
    full = _done(ds, "full_loss")
    per_prompt = masked.mean("sample", skipna=True).values  # (prompt, setting)
    full_mean = full.mean("sample", skipna=True).values  # (prompt,)
    count = masked.count("sample").values
    series = [(ALL, np.nanmean(per_prompt, axis=0), float(np.nanmean(full_mean)), count.min(axis=0))]
    series += [(pid, per_prompt[p], float(full_mean[p]), count[p]) for p, pid in enumerate(_prompt_ids(ds))]
    start, stop = ds["start"].values.astype(int), ds["stop"].values.astype(int)
    rows = [
        {
            "prompt_id": pid,
            "setting": j,
            "start": int(start[j]),
            "stop": int(stop[j]),
            "masked_loss": values[j],
            "full_loss": base,
            "delta": values[j] - base,
            "n_samples": int(counts[j]),
        }
        for pid, values, base, counts in series
        for j in range(len(start))
    ]
    return pd.DataFrame(rows)


def plot_truncation(curve: pd.DataFrame, line: float, path: str | Path) -> Path:
    """Figure 4.6: mean loss against the number of image tokens kept, one line per prompt, threshold."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for pid, rows in curve.groupby("prompt_id", sort=False):
        ax.plot(rows["k"], rows["mean_loss"], linewidth=1.2, label=f"prompt {pid}")
    ax.axhline(line, color="black", linestyle="--", linewidth=1, label=f"threshold {line:.3f}")
    ax.set_xlabel("image tokens kept (k)")
    ax.set_ylabel("mean caption loss")
    ax.set_title("caption loss vs image tokens kept (truncation)", fontsize=10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_reduction(curve: pd.DataFrame, reached: pd.DataFrame, path: str | Path) -> Path:
    """Share of the total loss reduction against the fraction of image tokens kept (pooled)."""
    path = Path(path)
    pooled = curve[curve["prompt_id"] == ALL]
    point = reached[reached["prompt_id"] == ALL].iloc[0]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(pooled["fraction"], pooled["reduction"], linewidth=1.4)
    ax.axhline(point["target"], color="grey", linestyle=":", linewidth=1)
    if np.isfinite(point["fraction"]):
        ax.axvline(point["fraction"], color="black", linestyle="--", linewidth=1)
        ax.set_title(f"{point['target']:.0%} of the reduction with {point['fraction']:.1%} of the image tokens")
    ax.set_xlabel("fraction of image tokens kept")
    ax.set_ylabel("share of the total loss reduction")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_masking(table: pd.DataFrame, path: str | Path) -> Path:
    """Figure 4.7: mean loss per masked token or interval (by its first token), unmasked loss dashed."""
    path = Path(path)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for pid, rows in table.groupby("prompt_id", sort=False):
        style = dict(color="black", linewidth=1.8) if pid == ALL else dict(linewidth=1, alpha=0.7)
        line = axes[0].plot(rows["start"], rows["masked_loss"], label=f"prompt {pid}", **style)[0]
        axes[0].axhline(rows["full_loss"].iloc[0], color=line.get_color(), linestyle="--", linewidth=0.8)
        axes[1].plot(rows["start"], rows["delta"], label=f"prompt {pid}", **style)
    axes[1].axhline(0, color="grey", linewidth=0.8)
    axes[0].set_ylabel("mean caption loss (dashed: nothing masked)")
    axes[1].set_ylabel("loss change from masking")
    axes[0].set_title("caption loss with image tokens masked", fontsize=10)
    axes[1].set_title("change from the unmasked loss (below 0: masking helps)", fontsize=10)
    for ax in axes:
        ax.set_xlabel("first masked image token (0-based)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_ablation_report(
    store: StoreLike, out: str | Path, *, group_name: str = "ablation", target: float = TARGET
) -> dict[str, Path]:
    """Write the CSV tables and PNG figures of an ablation group into ``out``; their paths by file name."""
    ds = ablation_group(store, group_name)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    if ds.attrs["mode"] == "truncate":
        curve, reduction = truncation_curve(ds), reduction_curve(ds)
        reached = tokens_for_reduction(ds, target)
        line = threshold(ds)
        reached.insert(1, "threshold", line)
        for name, table in (("summary", reached), ("truncation", curve), ("reduction", reduction)):
            paths.append(out / f"ablation_{name}.csv")
            table.to_csv(paths[-1], index=False)
        paths.append(plot_truncation(curve, line, out / "ablation_truncation.png"))
        paths.append(plot_reduction(reduction, reached, out / "ablation_reduction.png"))
    else:
        table = masking_table(ds)
        paths.append(out / "ablation_masking.csv")
        table.to_csv(paths[-1], index=False)
        paths.append(plot_masking(table, out / "ablation_masking.png"))
    return {path.name: path for path in paths}


def write_ablation(
    stores: list[StoreLike], out: str | Path, *, group_name: str = "ablation", target: float = TARGET
) -> dict[str, Path]:
    """`write_ablation_report` for each store (in ``out/<i>-<store name>/`` when several); paths by name."""
    out = Path(out)
    if len(stores) == 1:
        return write_ablation_report(stores[0], out, group_name=group_name, target=target)
    written: dict[str, Path] = {}
    for i, store in enumerate(stores):
        name = f"{i}-{Path(label(store).rstrip('/')).stem or 'store'}"
        report = write_ablation_report(store, out / name, group_name=group_name, target=target)
        written |= {f"{name}/{file}": path for file, path in report.items()}
    return written

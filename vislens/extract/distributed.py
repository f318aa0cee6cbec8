"""Extraction on a Dask cluster: one model per worker, each worker filling its own shards of one store.

`extract_on_cluster` splits the samples into ``shards`` (by default one per worker that has a
``GPU`` resource, dask-cuda's one-worker-per-GPU convention: ``dask cuda worker ADDRESS
--resources GPU=1``, or ``dask worker ADDRESS --resources GPU=1`` per GPU with its own
``CUDA_VISIBLE_DEVICES``; on a cluster without such workers, one per worker) and runs
`vislens.extract.extract` on each shard ``i/n`` as one task. Tasks ask for one ``GPU``, so a
worker runs one model at a time; a worker keeps its model loaded between its shards. Shard 0
runs first and creates the store (the others are submitted once the store is ready), exactly
as ``--shard i/n`` processes do, so the store is the one a single process writes with the same
arguments: shards own whole blocks of samples and never write the same file.

Failures: a worker that dies mid-shard leaves finished samples done; Dask runs the task again
(on another worker, or the restarted one) under the same writer id, and the shard resumes, so
nothing is lost and nothing computed twice. Rerunning the command resumes as well. Two runs
started on one store are refused by the store's writer claims (`vislens.store.claims`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from vislens.errors import ConfigError
from vislens.extract.config import ExtractConfig
from vislens.extract.run import ExtractResult, extract
from vislens.store import claims
from vislens.store.create import STATUS_READY
from vislens.store.location import as_location
from vislens.store.writer import read_root

log = logging.getLogger("vislens.extract")

RESOURCE = "GPU"

_MODELS: dict[tuple[str, ...], Any] = {}
_MODELS_LOCK = threading.Lock()


def worker_model(config: Any) -> Any:
    """The model of ``config`` (an extraction's or an ablation's), loaded once per worker process (one kept)."""
    from vislens.extract.adapters import load_adapter

    device = config.resolved_device()
    key = (config.model, device, config.dtype, str(config.revision))
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS.clear()  # free the previous model before loading the next
            _MODELS[key] = load_adapter(config.model, device=device, dtype=config.dtype, revision=config.revision)
        return _MODELS[key]


def forget_models() -> None:
    """Drop the models this worker process keeps (frees their memory)."""
    with _MODELS_LOCK:
        _MODELS.clear()


def quiet_worker_libraries() -> None:
    """No model-loading chatter in the worker's log unless vislens logs INFO (``vislens -v``)."""
    if logging.getLogger("vislens").getEffectiveLevel() <= logging.INFO:
        return
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def run_shard(config: ExtractConfig) -> ExtractResult:
    """One shard on this worker: `extract` with the worker's cached model."""
    quiet_worker_libraries()
    try:
        return extract(config, loaded=worker_model(config))
    except BaseException:
        claims.release_all(config.writer_id)  # the worker lives on: do not leave the claim alive
        raise


def gpu_workers(client: Any, resource: str = RESOURCE) -> list[str]:
    """Addresses of the workers that offer ``resource`` (e.g. one GPU each)."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return sorted(a for a, w in workers.items() if (w.get("resources") or {}).get(resource, 0) >= 1)


def _store_ready(config: ExtractConfig) -> bool:
    location = as_location(config.out, config.storage_options)
    location.fs.invalidate_cache()
    attrs = read_root(location)
    return bool(attrs) and attrs.get("vislens_status") == STATUS_READY


def _remove_store(config: ExtractConfig) -> None:
    location = as_location(config.out, config.storage_options)
    whole = claims.claim(location, "activations", claims.ALL, what="replacing (--overwrite)")
    try:
        location.remove()
    finally:
        whole.release()


def run_sharded(
    config: Any,
    client: Any,
    *,
    run: Callable[[Any], Any],
    name: str,
    ready: Callable[[Any], bool],
    remove: Callable[[Any], None],
    shards: int | None = None,
    resource: str = RESOURCE,
    poll_s: float = 0.5,
) -> list[Any]:
    """``run(config with shard i/n)`` for every shard as tasks of ``client``'s cluster: shard 0 first,
    the others once ``ready(config)`` (shard 0 has created what they write into); task keys
    are ``vislens-{name}-{tag}-{i}of{n}``. Returns the
    shards' results in shard order. With ``config.overwrite``, ``remove(config)`` runs here once
    first, so that a retried shard resumes instead of deleting its own work again.

    Raises
    ------
    ConfigError
        With ``config.shard`` other than 0/1 (the cluster splits the work itself), or no workers.
    Any error of a shard; the other shards are then cancelled (finished work stays: rerun to resume).
    """
    if config.shard != (0, 1):
        raise ConfigError(
            "--shard i/n splits the work over processes you start yourself; with --scheduler, use --shards"
        )
    gpus = gpu_workers(client, resource)
    n = shards or len(gpus) or len(client.scheduler_info(n_workers=-1)["workers"])
    if n < 1:
        raise ConfigError("the cluster has no workers; start some (`dask worker ADDRESS`) or wait for them")
    if config.overwrite:
        remove(config)
    tag = uuid.uuid4().hex[:8]
    configs = [
        dataclasses.replace(
            config, shard=(i, n), overwrite=False, progress=False, writer_id=f"cluster-{tag}-shard{i}of{n}"
        )
        for i in range(n)
    ]
    options: dict[str, Any] = {"pure": False, "resources": {resource: 1} if gpus else None}
    first = client.submit(run, configs[0], key=f"vislens-{name}-{tag}-0of{n}", priority=1, **options)
    while not ready(config):  # shard 0 creates the store; the others are submitted once it is there
        if first.done():
            first.result()  # raises shard 0's error
            break
        time.sleep(poll_s)
    rest = [client.submit(run, c, key=f"vislens-{name}-{tag}-{c.shard[0]}of{n}", **options) for c in configs[1:]]
    futures = [first, *rest]
    try:
        results = client.gather(futures)
    except BaseException:
        client.cancel(futures)
        raise
    log.info("%s on %d shards (%d GPU workers) done", name, n, len(gpus))
    return results


def extract_on_cluster(
    config: ExtractConfig,
    client: Any,
    *,
    shards: int | None = None,
    resource: str = RESOURCE,
    poll_s: float = 0.5,
) -> ExtractResult:
    """Run (or resume) the extraction of ``config`` on the workers of ``client``, shard by shard
    (`run_sharded`). Returns the shards' results summed (``store``, ``n_samples``, samples
    written, already done, skipped; ``seconds`` of the whole run).

    Raises
    ------
    ConfigError
        With ``config.shard`` other than 0/1 (the cluster splits the work itself), or no workers.
    Any error of a shard (e.g. `StoreMismatchError`, `StoreLockedError`); the other shards are
    then cancelled (finished samples stay: rerun to resume).
    """
    start = time.perf_counter()
    results: list[ExtractResult] = run_sharded(
        config,
        client,
        run=run_shard,
        name="extract",
        ready=_store_ready,
        remove=_remove_store,
        shards=shards,
        resource=resource,
        poll_s=poll_s,
    )
    total = ExtractResult(results[0].store, results[0].n_samples)
    for result in results:
        total.written += result.written
        total.already_done += result.already_done
        total.skipped.update(result.skipped)
    total.seconds = time.perf_counter() - start
    return total

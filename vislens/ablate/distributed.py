"""Ablation on a Dask cluster: one model per GPU worker, each filling its own shards of one group.

As `vislens.extract.distributed` does for extraction (and with its `run_sharded`): images are
split into ``shards`` of whole blocks (``--block``), shard 0 creates the group (and the store,
if new), the others are submitted once the group is ready; a worker keeps its model loaded
between shards; a killed worker's shard resumes under its writer id. The group equals the one a
single process writes with the same arguments.
"""

from __future__ import annotations

import time
from typing import Any

from vislens.ablate.config import AblateConfig
from vislens.ablate.run import AblateResult, ablate
from vislens.extract.distributed import RESOURCE, quiet_worker_libraries, run_sharded, worker_model
from vislens.store import claims
from vislens.store.ablation import group_ready
from vislens.store.location import as_location


def run_ablation_shard(config: AblateConfig) -> AblateResult:
    """One shard on this worker: `ablate` with the worker's cached model."""
    quiet_worker_libraries()
    try:
        return ablate(config, loaded=worker_model(config))
    except BaseException:
        claims.release_all(config.writer_id)
        raise


def _group_ready(config: AblateConfig) -> bool:
    return group_ready(as_location(config.out, config.storage_options), config.group)


def _remove_group(config: AblateConfig) -> None:
    location = as_location(config.out, config.storage_options)
    whole = claims.claim(location, config.group, claims.ALL, what="replacing (--overwrite)")
    try:
        if location.exists() and location.fs.exists(location.key(config.group)):
            location.fs.rm(location.key(config.group), recursive=True)
            location.fs.invalidate_cache()
    finally:
        whole.release()


def ablate_on_cluster(
    config: AblateConfig, client: Any, *, shards: int | None = None, resource: str = RESOURCE, poll_s: float = 0.5
) -> AblateResult:
    """Run (or resume) the ablation of ``config`` on the workers of ``client``, shard by shard.

    Returns the shards' results summed. Raises as `vislens.extract.distributed.run_sharded`.
    """
    start = time.perf_counter()
    results: list[AblateResult] = run_sharded(
        config,
        client,
        run=run_ablation_shard,
        name="ablate",
        ready=_group_ready,
        remove=_remove_group,
        shards=shards,
        resource=resource,
        poll_s=poll_s,
    )
    total = AblateResult(results[0].store, results[0].group, 0, results[0].n_settings)
    for result in results:
        total.n_pairs += result.n_pairs
        total.written += result.written
        total.already_done += result.already_done
        total.skipped.update(result.skipped)
        for field in ("forwards", "tokens", "attention_pairs"):
            setattr(total.work, field, getattr(total.work, field) + getattr(result.work, field))
    total.seconds = time.perf_counter() - start
    return total

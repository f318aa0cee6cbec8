"""Running on a Dask cluster: an existing one (its scheduler's address) or a local one, quietly.

`cluster` connects a `distributed.Client` to a running scheduler (started by ``dask scheduler``,
dask-jobqueue on SLURM, dask-kubernetes, ...) or starts a `LocalCluster` of worker processes,
and makes it the Dask scheduler of the block: every analysis inside runs on its workers.
`check_workers` makes sure, before any work, that the workers exist, run this vislens, and can
read each store with the options it was opened with (a local path must be on a shared
filesystem). Worker logs are not shown unless ``verbose`` (``vislens -v``). See docs/scaling.md.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from vislens.errors import ClusterError
from vislens.store.location import StoreLocation

log = logging.getLogger("vislens.cluster")

DASK_LOGGERS = (
    "distributed",
    "distributed.batched",
    "distributed.client",
    "distributed.core",
    "distributed.http.proxy",
    "distributed.nanny",
    "distributed.scheduler",
    "distributed.worker",
)


def quiet_dask(verbose: bool = False) -> None:
    """Keep distributed's INFO chatter out of the terminal (it sets its loggers when imported)."""
    level = logging.INFO if verbose else logging.ERROR
    for name in DASK_LOGGERS:
        logging.getLogger(name).setLevel(level)


def local_worker_env(workers: int) -> dict[str, str]:
    """Environment of local worker processes: zarr decodes on each worker's share of the cores.

    By default zarr decodes a sample's inner chunks on a thread pool as large as the machine, so
    that N single-threaded workers on N cores would fight over them (2 workers ran cosine 1.46x
    one worker here, 1.73x with one codec thread each: docs/scaling.md). A value the user set
    (``ZARR_THREADING__MAX_WORKERS``) is kept.
    """
    if "ZARR_THREADING__MAX_WORKERS" in os.environ:
        return {}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"ZARR_THREADING__MAX_WORKERS": str(max(1, cores // max(1, workers)))}


@contextmanager
def cluster(
    scheduler: str | None = None, workers: int = 0, *, verbose: bool = False, timeout_s: float = 30.0
) -> Iterator[Any]:
    """A `distributed.Client` on ``scheduler`` (an address such as ``tcp://host:8786``), or on a
    new local cluster of ``workers`` single-threaded processes (`local_worker_env`); None (Dask's
    threads) when neither.

    The client is the default scheduler inside the block and is closed after it (a cluster
    started here is shut down; an existing one is left running).

    Raises
    ------
    ClusterError
        When the scheduler cannot be reached within ``timeout_s`` or has no worker.
    """
    if scheduler and workers:
        raise ClusterError("give --scheduler (an existing cluster) or --workers (a local one), not both")
    if not scheduler and workers <= 0:
        yield None
        return
    from distributed import Client, LocalCluster

    quiet_dask(verbose)
    if scheduler:
        try:
            client = Client(scheduler, timeout=timeout_s)
        except (OSError, TimeoutError) as exc:
            raise ClusterError(
                f"cannot reach the Dask scheduler at {scheduler} ({exc}); start one (`dask scheduler`, then "
                "`dask worker ADDRESS` on each machine) or check the address"
            ) from None
        local = None
    else:
        local = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            silence_logs=logging.INFO if verbose else logging.ERROR,
            env=local_worker_env(workers),
        )
        client = Client(local)
    try:
        # vislens's own warnings from the workers appear here as in a single-process run; with
        # verbose, its INFO records too (the workers' other logs stay on the workers)
        level = logging.INFO if verbose else logging.WARNING
        client.run(_set_level, "vislens", level)
        client.forward_logging("vislens", level=level)
        yield client
    finally:
        try:
            client.unforward_logging("vislens")
        finally:
            client.close()
            if local is not None:
                local.close()


def _set_level(name: str, level: int) -> None:
    logging.getLogger(name).setLevel(level)


def _probe(location: StoreLocation | None) -> str:
    """On a worker: this vislens's version, after reading the store's root metadata (if given)."""
    import vislens
    from vislens.store.reader import check_root

    if location is not None:
        check_root(location)
    return vislens.__version__


def check_workers(client: Any, locations: Sequence[StoreLocation] = (), *, wait_s: float = 60.0) -> list[str]:
    """Check every worker before any work: one exists, it runs this vislens version, and it can
    read each store (root metadata, with the options the store was opened with). Returns the
    workers' addresses.

    Raises
    ------
    ClusterError
        Naming the worker, the store and the reason.
    """
    import vislens

    try:
        client.wait_for_workers(1, timeout=wait_s)
    except TimeoutError:
        raise ClusterError(
            f"the Dask scheduler {client.scheduler.address} has no worker after {wait_s:.0f} s; "
            "start workers with `dask worker ADDRESS` (or through your cluster manager)"
        ) from None
    addresses = sorted(client.scheduler_info(n_workers=-1)["workers"])
    for location in [None, *locations]:
        futures = {
            w: client.submit(_probe, location, workers=[w], pure=False, allow_other_workers=False) for w in addresses
        }
        for worker, future in futures.items():
            try:
                version = future.result(timeout=wait_s)
            except ImportError as exc:
                raise ClusterError(
                    f"worker {worker} cannot import vislens ({exc}); install vislens {vislens.__version__} "
                    "in the workers' environment"
                ) from None
            except Exception as exc:  # noqa: BLE001 - any failure to read is reported with its cause
                where = "" if location is None else f" read {location.url}"
                hint = (
                    " (a local path must be on a filesystem every worker mounts at the same path; or use s3://)"
                    if location is not None and "://" not in location.url
                    else " (check the --storage-options and the workers' credentials)"
                )
                raise ClusterError(f"worker {worker} cannot{where}: {exc}{hint}") from None
            if version != vislens.__version__:
                raise ClusterError(
                    f"worker {worker} runs vislens {version}, this client {vislens.__version__}; "
                    "install the same vislens on the client and every worker"
                )
    return addresses


def worker_pids(client: Any) -> dict[str, int]:
    """Each worker's process id (benchmarks and tests)."""
    return client.run(os.getpid)

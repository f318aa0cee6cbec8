"""Stores of both tiny architectures, extracted once, and a Dask LocalCluster for the tests."""

from __future__ import annotations

import pytest

from vislens.extract import ExtractConfig, extract
from vislens.store import open_store


@pytest.fixture(scope="session")
def analysis_stores(toy_models, manifest, tmp_path_factory) -> dict[str, str]:
    """Per architecture: 6 images x (normal, noisy, empty) prompts, text-query attention."""
    root = tmp_path_factory.mktemp("analysis")
    out = {}
    for arch, model in toy_models.items():
        path = str(root / f"{arch}.zarr")
        extract(
            ExtractConfig(
                model=str(model),
                data=str(manifest),
                out=path,
                prompts=("normal", "noisy", "empty"),
                batch_size=4,
                progress=False,
            )
        )
        out[arch] = path
    return out


@pytest.fixture
def tree(analysis_stores, request):
    """An opened store; parametrize indirectly with "mha" or "gqa"."""
    return open_store(analysis_stores[request.param])


@pytest.fixture(scope="session")
def dask_cluster():
    """A real Dask LocalCluster of 2 worker processes (use with dask.config.set(scheduler=...))."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    client = Client(cluster, set_as_default=False)
    yield client
    client.close()
    cluster.close()

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


@pytest.fixture(scope="session")
def norm_kind_cases(toy_models, manifest, analysis_stores, tmp_path_factory) -> dict[str, tuple[str, str]]:
    """Per final-norm kind, (store, checkpoint): ``rms`` (the grouped-query toy LLaVA, random non-unit
    weights), ``rms_offset`` (a Gemma-3 toy: ``x / rms(x) * (1 + w)``), ``layer`` (a LLaVA whose
    decoder is StableLM: LayerNorm with random weight and a non-zero random bias). Three images,
    normal prompts, no attention."""
    from tests.extract.test_layernorm_decoder import build_layernorm_llava
    from vislens.toys.families import build_toy_family

    root = tmp_path_factory.mktemp("norm-kinds")
    models = {
        "rms_offset": build_toy_family("gemma3", root / "gemma3", layers=2, seed=5),
        "layer": build_layernorm_llava(root / "llava-stablelm"),
    }
    out = {"rms": (analysis_stores["gqa"], str(toy_models["gqa"]))}
    for kind, model in models.items():
        path = str(root / f"{kind}.zarr")
        config = ExtractConfig(
            model=str(model), data=str(manifest), out=path, limit=3, attention="none", progress=False
        )
        assert extract(config).written == 3
        out[kind] = (path, str(model))
    return out

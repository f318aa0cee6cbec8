"""Shared test set-up.

Triton reads TRITON_INTERPRET when a kernel is decorated, so it is set here, before any
vislens module is imported, whenever no GPU is present.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from vislens.toys import ToySpec, build_toy_model  # noqa: E402
from vislens.toys.shapes import make_shapes  # noqa: E402

TOY_SPECS = {
    "mha": ToySpec(layers=3, heads=4, kv_heads=4, seed=1),
    "gqa": ToySpec(layers=3, heads=4, kv_heads=2, seed=2),
}


@pytest.fixture(scope="session")
def toy_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny LLaVA checkpoints saved with save_pretrained: multi-head and grouped-query."""
    root = tmp_path_factory.mktemp("models")
    return {name: build_toy_model(root / name, spec) for name, spec in TOY_SPECS.items()}


@pytest.fixture(scope="session")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six shapes-world images with captions, as a vislens manifest."""
    return make_shapes(tmp_path_factory.mktemp("data"), n=6, start=3)


S3_BUCKET = "vislens-test"


@pytest.fixture(scope="session")
def s3():
    """A moto S3 server on 127.0.0.1 (a real S3 API over HTTP, reachable from worker processes),
    with the bucket `S3_BUCKET`; yields the fsspec storage options."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._server.server_port}"
    boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1"
    ).create_bucket(Bucket=S3_BUCKET)
    yield {"key": "test", "secret": "test", "endpoint_url": endpoint, "client_kwargs": {"region_name": "us-east-1"}}
    server.stop()


@pytest.fixture
def write_manifest(tmp_path: Path):
    """Write manifest lines (dicts or raw strings) to a file and return its path."""

    def write(lines: list, name: str = "manifest.jsonl") -> Path:
        path = tmp_path / name
        path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
        return path

    return write

"""Remote stores: the same extraction written to S3 (a real S3 API server on loopback) and
memory://, and read back from S3, memory://, plain HTTP and HTTPS (a self-signed certificate made here), equal to the local store."""

from __future__ import annotations

import functools
import http.server
import io
import os
import shutil
import ssl
import threading

import numpy as np
import pytest

from tests.conftest import S3_BUCKET as BUCKET
from tests.helpers import self_signed_certificate
from tests.store.conftest import extract_config
from vislens.analyze import cosine
from vislens.extract import extract
from vislens.store import open_store


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with HTTP Range requests (as S3, nginx or any CDN serve them)."""

    def log_message(self, *args):
        pass

    def send_head(self):
        spec = self.headers.get("Range")
        path = self.translate_path(self.path)
        if not spec or not os.path.isfile(path):
            return super().send_head()
        data = open(path, "rb").read()
        start_text, end_text = spec.removeprefix("bytes=").split("-")
        if start_text == "":
            start, end = max(0, len(data) - int(end_text)), len(data) - 1
        else:
            start, end = int(start_text), min(int(end_text or len(data) - 1), len(data) - 1)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        return io.BytesIO(data[start : end + 1])


def _serve(root, tls: ssl.SSLContext | None = None):
    handler = functools.partial(RangeHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def http_root(tmp_path_factory):
    """A plain HTTP server on 127.0.0.1 serving a folder; yields (folder, base URL)."""
    root = tmp_path_factory.mktemp("www")
    server = _serve(root)
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def https_root(tmp_path_factory):
    """An HTTPS server on 127.0.0.1 with a self-signed certificate; yields (folder, URL, CA file)."""
    root = tmp_path_factory.mktemp("www-tls")
    cert, key = self_signed_certificate(tmp_path_factory.mktemp("tls"), "127.0.0.1")
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    server = _serve(root, tls)
    yield root, f"https://127.0.0.1:{server.server_address[1]}", cert
    server.shutdown()


def _assert_same(tree, reference):
    for group in ("activations", "attention", "lens", "captions"):
        ours, theirs = tree[group].to_dataset(), reference[group].to_dataset()
        assert sorted(ours.data_vars) == sorted(theirs.data_vars)
        for name in theirs.data_vars:
            np.testing.assert_array_equal(ours[name].values, theirs[name].values, err_msg=f"{group}/{name}")
    assert tree.attrs["model"] == reference.attrs["model"]


def test_extract_to_s3_and_read_back(s3, toy_models, manifest, store_path):
    url = f"s3://{BUCKET}/run/s.zarr"
    result = extract(extract_config(toy_models["gqa"], manifest, url, storage_options=s3))
    assert result.written == 12
    tree = open_store(url, storage_options=s3)
    _assert_same(tree, open_store(str(store_path)))
    # analyses run on the remote store directly
    local = cosine(open_store(str(store_path)))
    np.testing.assert_allclose(cosine(tree)["inter_modal"].values, local["inter_modal"].values)


def test_resume_on_s3_computes_nothing_twice(s3, toy_models, manifest):
    url = f"s3://{BUCKET}/resume/s.zarr"
    first = extract(extract_config(toy_models["gqa"], manifest, url, storage_options=s3, limit=2))
    again = extract(extract_config(toy_models["gqa"], manifest, url, storage_options=s3, limit=2))
    assert (first.written, again.written, again.already_done) == (4, 0, 4)


def test_memory_store_round_trip(toy_models, manifest, store_path):
    url = "memory://vislens-tests/s.zarr"
    extract(extract_config(toy_models["gqa"], manifest, url))
    _assert_same(open_store(url), open_store(str(store_path)))


def test_read_only_http(http_root, store_path):
    root, base = http_root
    shutil.copytree(store_path, root / "s.zarr")
    tree = open_store(f"{base}/s.zarr")
    _assert_same(tree, open_store(str(store_path)))


def test_read_only_https(https_root, store_path):
    root, base, ca_file = https_root
    shutil.copytree(store_path, root / "s.zarr")
    trusted = {"ssl": ssl.create_default_context(cafile=str(ca_file))}
    tree = open_store(f"{base}/s.zarr", storage_options=trusted)
    _assert_same(tree, open_store(str(store_path)))
    # a certificate nobody vouched for is refused, not silently accepted
    with pytest.raises(Exception, match="(?i)certificate"):
        open_store(f"{base}/s.zarr")


def test_file_url(store_path):
    tree = open_store(f"file://{store_path}")
    _assert_same(tree, open_store(str(store_path)))

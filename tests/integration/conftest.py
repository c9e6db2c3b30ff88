"""Fixtures of the integration tests: an S3 endpoint (moto's server on 127.0.0.1, read through s3fs).

s3fs (through botocore) finds the endpoint in AWS_ENDPOINT_URL and credentials in AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY, exactly as a user's job would for MinIO, Ceph or a cloud bucket; the variables
are set in this process's environment, so `medtune` subprocesses started by a test find them too.
"""

from __future__ import annotations

import logging
import urllib.request

import pytest

from tests_support import S3_BUCKET, free_port


class S3Endpoint:
    def __init__(self, port: int) -> None:
        self.port = port
        self.server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        # moto keeps buckets in process-wide state, so a stopped and restarted server still has them.
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True)


@pytest.fixture
def s3(monkeypatch):
    s3fs = pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    endpoint = S3Endpoint(free_port())
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{endpoint.port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "medtune-test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "medtune-test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # the tests exercise medtune's retries, not botocore's
    endpoint.start()
    # moto's state is process-wide: start each test from an empty endpoint.
    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{endpoint.port}/moto-api/reset", method="POST"))
    s3fs.S3FileSystem.clear_instance_cache()
    endpoint.fs().mkdir(S3_BUCKET)
    yield endpoint
    endpoint.stop()
    s3fs.S3FileSystem.clear_instance_cache()

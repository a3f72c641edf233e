"""A local S3-compatible server (moto), the stand-in for a bucket: real S3 requests over HTTP.

:func:`moto_server` starts ``moto_server`` as a subprocess on a free 127.0.0.1 port and stops it
by its pid; :func:`s3_env` is the environment that points boto/s3fs/pyarrow/DVC at it.

S3 applies a conditional PUT (``If-None-Match``/``If-Match``) atomically; moto's threaded server
checks the condition and then stores the object, so two requests at the same moment could both
pass. ``atomic_puts=True`` (the lease tests) serialises its PutObject handler with a lock, which
gives the stand-in S3's guarantee; nothing else about the server changes.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from pipeline.cluster.raycluster import free_ports

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def s3_env(endpoint: str) -> dict[str, str]:
    """Environment variables that send every S3 client to ``endpoint`` with test credentials."""
    return {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}


ATOMIC_PUTS = """
import sys, threading
from moto.s3.responses import S3Response
from moto.server import main
lock, put = threading.Lock(), S3Response.put_object
def put_object(self):
    with lock:
        return put(self)
S3Response.put_object = put_object
main(sys.argv[1:])
"""


@contextlib.contextmanager
def moto_server(log: Path, timeout_s: float = 30.0, atomic_puts: bool = False) -> Iterator[str]:
    """A running moto S3 server; yields its endpoint URL (http://127.0.0.1:PORT)."""
    (port,) = free_ports(1)
    server = [str(Path(sys.executable).parent / "moto_server")]
    if atomic_puts:
        server = [sys.executable, "-c", ATOMIC_PUTS]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*server, "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **CREDENTIALS},
        )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto_server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def make_bucket(endpoint: str, name: str) -> None:
    """Create the bucket ``name`` on the server."""
    import boto3

    boto3.client("s3", endpoint_url=endpoint, **_credentials()).create_bucket(Bucket=name)


def list_keys(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    """Every object key in ``bucket`` under ``prefix``."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, **_credentials())
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def _credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "region_name": CREDENTIALS["AWS_DEFAULT_REGION"],
    }


def read_object(endpoint: str, bucket: str, key: str) -> bytes:
    """The bytes of one object."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, **_credentials())
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def endpoint_fixture(bucket: str, atomic_puts: bool = False):
    """A module-scoped pytest fixture: a moto server holding an empty ``bucket``, its URL.
    ``endpoint = endpoint_fixture(BUCKET)`` in a test module."""
    import pytest

    @pytest.fixture(scope="module")
    def endpoint(tmp_path_factory) -> Iterator[str]:
        log = tmp_path_factory.mktemp("moto") / "moto.log"
        with moto_server(log, atomic_puts=atomic_puts) as url:
            make_bucket(url, bucket)
            yield url

    return endpoint


def folder_or_bucket(request, tmp_path: Path, monkeypatch, bucket: str):
    """The body of a ``store`` fixture parametrised over ``["folder", "s3"]``: a folder store
    in ``tmp_path``, or a fresh prefix of ``bucket`` on the test module's ``endpoint`` fixture
    (its S3 environment set for the test)."""
    from pipeline.cluster.storage_fs import Store

    if request.param == "folder":
        return Store.parse(str(tmp_path / "shared"))
    for key, value in s3_env(request.getfixturevalue("endpoint")).items():
        monkeypatch.setenv(key, value)
    return Store.parse(f"s3://{bucket}/{request.node.name.split('[')[0]}-{time.time_ns()}")

"""Images in an S3-compatible object store (MAXMIN_IMAGE_STORE=s3://...), so that several replicas
share them. No S3 server installs from the registries here: these tests run against the
S3-compatible server that moto runs in server mode, on loopback, through the real boto3 client."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from pydantic import ValidationError

from app.core.config import Settings
from tests.helpers import free_port, png_bytes


@pytest.fixture(scope="module")
def s3_url() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            mp.setenv(key, value)
        yield f"http://127.0.0.1:{port}"
    server.stop()


def _bucket(url: str, name: str):  # noqa: ANN202
    s3 = boto3.client("s3", endpoint_url=url)
    s3.create_bucket(Bucket=name)
    return s3


@pytest.mark.parametrize("writer_process", ["false", "true"])
def test_images_go_to_the_bucket(
    trained_run: Path, service_client, db_url: str, s3_url: str, writer_process: str, tmp_path
) -> None:
    bucket = f"parts-{writer_process}-{db_url.split(':')[0].replace('+', '-')}"
    s3 = _bucket(s3_url, bucket)
    image = png_bytes(11)
    sha = hashlib.sha256(image).hexdigest()
    with service_client(
        trained_run,
        db_url=db_url,
        image_store=f"s3://{bucket}/line-3",
        s3_endpoint_url=s3_url,
        writer_process=writer_process,
    ) as client:
        r = client.post("/predict", content=image, headers={"Content-Type": "image/png"})
        assert r.status_code == 200, r.text
        assert r.json()["data"][0]["image_sha256"] == sha
        stored = s3.get_object(Bucket=bucket, Key=f"line-3/{sha[:2]}/{sha}")["Body"].read()
        assert stored == image
        # Read back through the service, as the review page does.
        back = client.get(f"/images/{sha}")
        assert back.status_code == 200 and back.content == image
        assert back.headers["content-type"] == "image/png"
        assert client.get(f"/images/{'0' * 64}").status_code == 404
    assert not list((tmp_path / "var").glob("images/*/*")), "nothing on the local disk"


def test_bucket_down_is_a_503_and_stores_nothing(
    trained_run: Path, service_client, s3_url: str
) -> None:
    """A bucket that does not exist stands for a store that refuses writes."""
    with service_client(
        trained_run, image_store="s3://no-such-bucket", s3_endpoint_url=s3_url
    ) as client:
        r = client.post("/predict", content=png_bytes(12), headers={"Content-Type": "image/png"})
        assert r.status_code == 503 and "image storage unavailable" in r.json()["detail"]
        listed = client.get("/predictions").json()
        assert listed["count"] == 0


def test_store_url_is_checked() -> None:
    with pytest.raises(ValidationError, match="s3://bucket"):
        Settings(image_store="bucket/prefix")

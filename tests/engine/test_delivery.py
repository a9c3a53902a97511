"""Images inline, or in a bucket when they would not fit: a real S3 API (moto) on localhost."""

from __future__ import annotations

import base64

import boto3
import pytest
import requests

from engine.delivery import EncodedImage, inline_size
from engine.worker import Worker
from tests.conftest import free_port

REQUEST = {"prompt": "a red fox", "num_inference_steps": 2, "seed": 9, "num_images": 2}
KEYS = {"bucket_access_key_id": "test-key", "bucket_secret_access_key": "test-secret", "bucket_name": "images"}


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="test-key",
        aws_secret_access_key="test-secret",
        region_name="us-east-1",
    ).create_bucket(Bucket="images")
    yield endpoint
    server.stop()


@pytest.fixture(scope="module")
def inline_images(cache_dir, tmp_path_factory):
    from engine.settings import Settings

    settings = Settings(cache_dir=cache_dir, engine_dir=tmp_path_factory.mktemp("e"), device="cpu", backend="torch")
    response = Worker(settings).handle({"id": "inline", "input": REQUEST})
    assert response["metrics"]["delivery"] == "inline"
    return [base64.b64decode(item["image"]) for item in response["output"]]


def test_inline_size_counts_base64(tmp_path):
    image = EncodedImage(b"x" * 300, 1, 64, 64, "png")
    assert inline_size([image, image]) == 2 * (400 + 200)


def test_images_over_the_inline_limit_go_to_the_bucket(s3_endpoint, inline_images, make_settings):
    worker = Worker(make_settings(backend="torch", bucket_endpoint_url=s3_endpoint, max_inline_bytes=1000, **KEYS))
    response = worker.handle({"id": "job-1", "input": REQUEST})
    assert response["status"] == "success", response
    assert response["metrics"]["delivery"] == "bucket"
    for item, expected in zip(response["output"], inline_images, strict=True):
        assert "image" not in item and item["url"].startswith(s3_endpoint)
        assert "job-1/" in item["url"]
        download = requests.get(item["url"], timeout=30)
        assert download.status_code == 200
        assert download.content == expected


def test_small_outputs_stay_inline_unless_every_upload_is_asked_for(s3_endpoint, make_settings):
    settings = dict(backend="torch", bucket_endpoint_url=s3_endpoint, **KEYS)
    assert Worker(make_settings(**settings)).handle({"id": "a", "input": REQUEST})["metrics"]["delivery"] == "inline"
    always = Worker(make_settings(always_upload=True, **settings)).handle({"id": "b", "input": REQUEST})
    assert always["metrics"]["delivery"] == "bucket"


def test_too_large_without_a_bucket_is_a_clear_error_and_the_worker_goes_on(make_settings):
    worker = Worker(make_settings(backend="torch", max_inline_bytes=4000))
    response = worker.handle({"id": "c", "input": REQUEST})
    assert response["status"] == "error"
    assert response["error"].startswith("output: 2 png images of 64x64 come to")
    assert "BUCKET_ENDPOINT_URL" in response["error"]
    smaller = worker.handle({"id": "d", "input": {**REQUEST, "num_images": 1, "output_format": "jpeg", "quality": 20}})
    assert smaller["status"] == "success" and smaller["metrics"]["delivery"] == "inline"

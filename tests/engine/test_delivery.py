"""Images inline, or in a bucket when they would not fit: a real S3 API (moto) on localhost."""

from __future__ import annotations

import base64
import logging
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from engine.common.errors import ConfigError
from engine.serving.delivery import INLINE_AFTER_FAILED_UPLOAD, EncodedImage, inline_size
from engine.serving.worker import Worker
from engine.settings import load_settings
from tests.conftest import free_port

REQUEST = {"prompt": "a red fox", "num_inference_steps": 2, "seed": 9, "num_images": 2}
KEYS = {"bucket_access_key_id": "test-key", "bucket_secret_access_key": "test-secret", "bucket_name": "images"}


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


def test_uploads_carry_their_content_type_and_the_configured_expiry(s3_endpoint, make_settings):
    settings = make_settings(
        backend="torch", bucket_endpoint_url=s3_endpoint, always_upload=True, bucket_url_expiry_s=90, **KEYS
    )
    worker = Worker(settings)
    for output_format, content_type in (("png", "image/png"), ("jpeg", "image/jpeg"), ("webp", "image/webp")):
        response = worker.handle({"id": f"t-{output_format}", "input": {**REQUEST, "output_format": output_format}})
        assert response["metrics"]["delivery"] == "bucket", response
        for item in response["output"]:
            assert parse_qs(urlsplit(item["url"]).query)["X-Amz-Expires"] == ["90"]
            download = requests.get(item["url"], timeout=30)
            assert download.status_code == 200
            assert download.headers["Content-Type"] == content_type


def test_the_url_expiry_is_bounded_by_what_s3_allows():
    assert load_settings(device="cpu").bucket_url_expiry_s == 7 * 24 * 3600
    for bad in (0, 7 * 24 * 3600 + 1):
        with pytest.raises(ConfigError, match="BUCKET_URL_EXPIRY_S"):
            load_settings(device="cpu", bucket_url_expiry_s=bad)


FAILING_BUCKETS = {
    "missing bucket": lambda endpoint: {"bucket_endpoint_url": endpoint, "bucket_name": "no-such-bucket"},
    "unreachable endpoint": lambda endpoint: {
        "bucket_endpoint_url": f"http://user:HIDDEN-PASSWORD@127.0.0.1:{free_port()}/path?sig=HIDDEN-QUERY"
    },
}
SECRETS = ("HIDDEN-KEY", "HIDDEN-SECRET", "HIDDEN-PASSWORD", "HIDDEN-QUERY")


@pytest.mark.parametrize("failure", FAILING_BUCKETS)
def test_a_failed_upload_of_images_that_fit_falls_back_to_inline(
    failure, s3_endpoint, inline_images, make_settings, caplog
):
    bucket = {"bucket_access_key_id": "HIDDEN-KEY", "bucket_secret_access_key": "HIDDEN-SECRET"}
    bucket.update(FAILING_BUCKETS[failure](s3_endpoint))
    worker = Worker(make_settings(backend="torch", always_upload=True, **bucket))
    with caplog.at_level(logging.ERROR, logger="engine.serving.delivery"):
        response = worker.handle({"id": "fallback", "input": REQUEST})
    assert response["status"] == "success", response
    assert response["metrics"]["delivery"] == INLINE_AFTER_FAILED_UPLOAD
    assert [base64.b64decode(item["image"]) for item in response["output"]] == inline_images
    [record] = [record for record in caplog.records if record.name == "engine.serving.delivery"]
    reason = record.getMessage()
    assert reason.startswith("bucket upload failed: ")
    assert ("NoSuchBucket" if failure == "missing bucket" else "127.0.0.1") in reason
    assert not any(secret in reason or secret in str(response) for secret in SECRETS), reason


def test_a_failed_upload_of_images_too_large_inline_is_a_clear_error(s3_endpoint, make_settings):
    endpoint = f"http://user:HIDDEN-PASSWORD@127.0.0.1:{free_port()}?sig=HIDDEN-QUERY"
    bucket = {"bucket_access_key_id": "HIDDEN-KEY", "bucket_secret_access_key": "HIDDEN-SECRET"}
    worker = Worker(make_settings(backend="torch", bucket_endpoint_url=endpoint, max_inline_bytes=1000, **bucket))
    response = worker.handle({"id": "too-large", "input": REQUEST})
    assert response["status"] == "error"
    assert response["error"].startswith("output: the bucket upload failed (the worker's log has the reason), and 2 png")
    assert "127.0.0.1" not in response["error"]
    assert not any(secret in str(response) for secret in SECRETS), response

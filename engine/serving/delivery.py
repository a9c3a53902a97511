"""Getting images to the caller: inline base64, or a bucket when they would not fit.

RunPod rejects results above 10 MB on /run and 20 MB on /runsync, after the job has
run. The guard measures the response before it is returned, and either switches to
the configured bucket or fails with an error that says what to change. A bucket that
refuses the upload is not the caller's fault: images that fit inline are then returned
inline, and the log keeps the reason with the bucket's credentials removed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from engine.common.errors import OutputTooLarge
from engine.serving.encode import to_base64
from engine.settings import Settings

log = logging.getLogger(__name__)

ITEM_OVERHEAD_BYTES = 200
"""JSON keys, seed, sizes and format around each image's base64."""

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
"""What a browser opening a presigned URL needs to show the image rather than download it."""

INLINE_AFTER_FAILED_UPLOAD = "inline (bucket upload failed)"


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    seed: int
    width: int
    height: int
    format: str

    def describe(self) -> dict[str, Any]:
        return {"seed": self.seed, "width": self.width, "height": self.height, "format": self.format}


def inline_size(images: list[EncodedImage]) -> int:
    return sum((len(image.data) + 2) // 3 * 4 + ITEM_OVERHEAD_BYTES for image in images)


class UploadFailed(Exception):
    """The bucket refused or could not be reached; the message is already free of credentials."""


class Delivery:
    def __init__(self, settings: Settings):
        self.settings = settings

    def deliver(
        self, job_id: str, images: list[EncodedImage], upload: bool = False
    ) -> tuple[list[dict[str, Any]], str]:
        """Output items and how they were delivered ("inline", "bucket", or inline after a failed upload);
        ``upload`` asks for the bucket whatever the size, as ALWAYS_UPLOAD does for every job."""
        size = inline_size(images)
        fits = size <= self.settings.max_inline_bytes
        how = "inline"
        if self.settings.bucket_configured and (self.settings.always_upload or upload or not fits):
            try:
                return self._upload_all(job_id, images), "bucket"
            except UploadFailed as error:
                log.error("bucket upload failed: %s", error)
                if not fits:
                    raise OutputTooLarge(
                        f"output: the bucket upload failed (the worker's log has the reason), and "
                        f"{self._too_large(images, size)}; ask for jpeg or webp, or fewer or smaller images"
                    ) from None
                how = INLINE_AFTER_FAILED_UPLOAD
        elif not fits:
            raise OutputTooLarge(
                f"output: {self._too_large(images, size)} (RunPod accepts 10 MB on /run); ask for jpeg or webp, "
                "fewer or smaller images, or configure a bucket (BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID, "
                "BUCKET_SECRET_ACCESS_KEY)"
            )
        return [{"image": to_base64(image.data), **image.describe()} for image in images], how

    def _too_large(self, images: list[EncodedImage], size: int) -> str:
        first = images[0]
        return (
            f"{len(images)} {first.format} images of {first.width}x{first.height} come to {size / 1e6:.1f} MB inline, "
            f"above the {self.settings.max_inline_bytes / 1e6:.1f} MB limit"
        )

    def _upload_all(self, job_id: str, images: list[EncodedImage]) -> list[dict[str, Any]]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            client = self._client()
            return [self._upload(client, job_id, index, image) for index, image in enumerate(images)]
        except (BotoCoreError, ClientError, ValueError, OSError) as error:
            raise UploadFailed(self._redact(f"{type(error).__name__}: {error}")) from None

    def _client(self) -> Any:
        """runpod's S3 client (signature v4, retries, the region read from the endpoint's host name)."""
        from runpod.serverless.utils import rp_upload  # configures logging on import: only when used

        client, _ = rp_upload.get_boto_client(
            {
                "endpointUrl": self.settings.bucket_endpoint_url,
                "accessId": self.settings.bucket_access_key_id,
                "accessSecret": self.settings.bucket_secret_access_key,
            }
        )
        return client

    def _upload(self, client: Any, job_id: str, index: int, image: EncodedImage) -> dict[str, Any]:
        bucket = self.settings.bucket_name or time.strftime("%m-%y")  # runpod's default bucket name
        key = f"{job_id}/{index}-{image.seed}.{image.format}"
        client.put_object(Bucket=bucket, Key=key, Body=image.data, ContentType=CONTENT_TYPES[image.format])
        url = client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=self.settings.bucket_url_expiry_s
        )
        return {"url": url, **image.describe()}

    def _redact(self, text: str) -> str:
        """The text without the bucket's keys, nor the endpoint's user, password, path or query."""
        settings = self.settings
        endpoint = settings.bucket_endpoint_url or ""
        parts = urlsplit(endpoint)
        userinfo, _, host = parts.netloc.rpartition("@")
        if endpoint:
            text = text.replace(endpoint, f"{parts.scheme}://{host}" if host else "the endpoint")
        for secret in (userinfo, settings.bucket_access_key_id, settings.bucket_secret_access_key):
            if secret:
                text = text.replace(secret, "***")
        return text

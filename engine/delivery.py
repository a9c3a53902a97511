"""Getting images to the caller: inline base64, or a bucket when they would not fit.

RunPod rejects results above 10 MB on /run and 20 MB on /runsync, after the job has
run. The guard measures the response before it is returned, and either switches to
the configured bucket or fails with an error that says what to change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from engine.errors import OutputTooLarge
from engine.images import to_base64
from engine.settings import Settings

log = logging.getLogger(__name__)

ITEM_OVERHEAD_BYTES = 200
"""JSON keys, seed, sizes and format around each image's base64."""


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


class Delivery:
    def __init__(self, settings: Settings):
        self.settings = settings

    def deliver(self, job_id: str, images: list[EncodedImage]) -> tuple[list[dict[str, Any]], str]:
        """Output items and how they were delivered ("inline" or "bucket")."""
        size = inline_size(images)
        fits = size <= self.settings.max_inline_bytes
        if self.settings.bucket_configured and (self.settings.always_upload or not fits):
            return [self._upload(job_id, index, image) for index, image in enumerate(images)], "bucket"
        if not fits:
            first = images[0]
            raise OutputTooLarge(
                f"output: {len(images)} {first.format} images of {first.width}x{first.height} come to "
                f"{size / 1e6:.1f} MB inline, above the {self.settings.max_inline_bytes / 1e6:.1f} MB limit "
                "(RunPod accepts 10 MB on /run); ask for jpeg or webp, fewer or smaller images, or configure "
                "a bucket (BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID, BUCKET_SECRET_ACCESS_KEY)"
            )
        return [{"image": to_base64(image.data), **image.describe()} for image in images], "inline"

    def _upload(self, job_id: str, index: int, image: EncodedImage) -> dict[str, Any]:
        from runpod.serverless.utils import rp_upload  # configures logging on import: only when used

        credentials = {
            "endpointUrl": self.settings.bucket_endpoint_url,
            "accessId": self.settings.bucket_access_key_id,
            "accessSecret": self.settings.bucket_secret_access_key,
        }
        url = rp_upload.upload_in_memory_object(
            f"{index}-{image.seed}.{image.format}",
            image.data,
            bucket_creds=credentials,
            bucket_name=self.settings.bucket_name,
            prefix=job_id,
        )
        return {"url": url, **image.describe()}

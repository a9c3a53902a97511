"""The size ranges ``ENGINE_PROFILES`` configures: image sides and batch an engine covers.

A range is written in request terms, ``MIN-MAX@OPTxBATCH`` (image sides in pixels, images
per request), or ``SIZExBATCH`` for a static profile. Settings check the syntax at start-up;
``engine.store.profiles`` turns a range into each component's shapes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

RANGE_PATTERN = re.compile(r"^(?:(\d+)-(\d+)@)?(\d+)x(\d+)$")


@dataclass(frozen=True)
class SizeRange:
    """Requests an engine covers: image sides from min to max (optimized for opt), up to max_batch images."""

    min_size: int
    opt_size: int
    max_size: int
    max_batch: int

    @property
    def static(self) -> bool:
        return self.min_size == self.max_size and self.max_batch == 1

    @property
    def label(self) -> str:
        if self.static:
            return f"{self.opt_size}x1"
        return f"{self.min_size}-{self.max_size}@{self.opt_size}x{self.max_batch}"

    @classmethod
    def parse(cls, text: str) -> SizeRange:
        match = RANGE_PATTERN.match(text.strip())
        if match is None:
            raise ValueError(f"engine profile {text!r} is not MIN-MAX@OPTxBATCH or SIZExBATCH")
        low, high, opt, batch = match.groups()
        opt_size, max_batch = int(opt), int(batch)
        min_size, max_size = (int(low), int(high)) if low else (opt_size, opt_size)
        if not min_size <= opt_size <= max_size or max_batch < 1 or min_size % 8 or max_size % 8 or opt_size % 8:
            raise ValueError(f"engine profile {text!r}: need MIN <= OPT <= MAX, multiples of 8, and BATCH >= 1")
        return cls(min_size, opt_size, max_size, max_batch)


def default_ranges(native_size: int, max_images: int) -> list[SizeRange]:
    """Half to one and a half times the model's native side, optimized for the native side, up to
    ``MAX_IMAGES`` images: every batch the request limits accept (prompts never outnumber images)."""
    low = max(64, native_size // 2 // 8 * 8)
    high = native_size * 3 // 2 // 8 * 8
    return [SizeRange(low, native_size, high, max_images)]


def parse_ranges(text: str | None, native_size: int, max_images: int) -> list[SizeRange]:
    if not text:
        return default_ranges(native_size, max_images)
    return [SizeRange.parse(part) for part in text.split(",") if part.strip()]

"""Engine optimization profiles: derived from configured size ranges, matched against requests.

A configured range is written in request terms, ``MIN-MAX@OPTxBATCH`` (image sides in
pixels, images per request), or ``SIZExBATCH`` for a static profile. Each component's
spec turns it into per-input min/opt/max shapes, in latent units for the UNet and VAE
and with the classifier-free-guidance doubling where the component batches it. Text
encoders and the UNet also cover prompts from one chunk of 77 tokens (the optimum) to
``MAX_PROMPT_CHUNKS`` chunks; IP-Adapter components from one image prompt (4 tokens) to
``MAX_IP_ADAPTER_IMAGES`` (16 tokens each: Plus's), for each adapter slot. Pure logic: it runs and
is tested without TensorRT.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from engine.request.ip_adapter_entry import MAX_IP_ADAPTER_IMAGES
from engine.sizes import SizeRange
from engine.spec import ComponentSpec, Dims, Shape

MAX_IP_TOKENS = 16 * MAX_IP_ADAPTER_IMAGES
"""The most image-prompt tokens an IP denoiser engine covers: Plus's 16 per image (Full Face's 257 are not)."""


@dataclass(frozen=True)
class ShapeRange:
    minimum: Shape
    optimum: Shape
    maximum: Shape


@dataclass(frozen=True)
class Profile:
    """One TensorRT optimization profile: a shape range per input."""

    label: str
    inputs: tuple[tuple[str, ShapeRange], ...]

    def shapes(self) -> dict[str, ShapeRange]:
        return dict(self.inputs)

    def unsupported_reason(self, shapes: Mapping[str, Shape]) -> str | None:
        for name, allowed in self.inputs:
            shape = shapes[name]
            if len(shape) != len(allowed.minimum):
                return f"{name} has rank {len(shape)}, the engine {len(allowed.minimum)}"
            for axis, (size, low, high) in enumerate(zip(shape, allowed.minimum, allowed.maximum, strict=True)):
                if not low <= size <= high:
                    return f"profile {self.label}: {name} axis {axis} is {size}, the engine covers {low}..{high}"
        return None

    def distance(self, shapes: Mapping[str, Shape]) -> int:
        """How far a request is from the shapes the engine was tuned for."""
        return sum(
            abs(size - best)
            for name, allowed in self.inputs
            for size, best in zip(shapes[name], allowed.optimum, strict=True)
        )

    @property
    def span(self) -> int:
        """How much a profile stretches; among equally close engines the narrowest is the fastest."""
        return sum(high - low for _, r in self.inputs for low, high in zip(r.minimum, r.maximum, strict=True))

    def to_json(self) -> dict:
        return {
            "label": self.label,
            "inputs": {
                name: {"min": list(r.minimum), "opt": list(r.optimum), "max": list(r.maximum)}
                for name, r in self.inputs
            },
        }

    @classmethod
    def from_json(cls, data: Mapping) -> Profile:
        inputs = tuple(
            (name, ShapeRange(tuple(r["min"]), tuple(r["opt"]), tuple(r["max"]))) for name, r in data["inputs"].items()
        )
        return cls(label=data["label"], inputs=inputs)


def profile_for(spec: ComponentSpec, size_range: SizeRange, max_prompt_chunks: int = 1) -> Profile:
    """The component's input shapes at the range's minimum, optimum and maximum.

    The minimum runs without guidance (one row per image); optimum and maximum with it.
    Prompts run from one chunk (the minimum and the optimum) to ``max_prompt_chunks``; a
    component whose shapes follow the prompt's length says its token range in the label.
    A static range gives one shape, the optimum with guidance. A reference image's axes (Flux
    Kontext's) span the spec's ``reference_sides``, whatever the range, and the label says so.
    """
    least, best, most = spec.reference_sides or (None, None, None)
    opt = size_range.opt_size
    optimum = spec.input_shapes(Dims(1, opt, opt, reference_height=best, reference_width=best), guidance=True)
    if size_range.static and max_prompt_chunks == 1 and spec.reference_sides is None:
        minimum = maximum = optimum
    else:
        low, high = (opt, opt) if size_range.static else (size_range.min_size, size_range.max_size)
        smallest = Dims(1, low, low, reference_height=least, reference_width=least)
        minimum = spec.input_shapes(smallest, guidance=size_range.static)
        largest = Dims(
            size_range.max_batch,
            high,
            high,
            max_prompt_chunks,
            reference_height=most,
            reference_width=most,
            ip_tokens=MAX_IP_TOKENS,
            ip_tokens_2=MAX_IP_TOKENS,
            ip_images=MAX_IP_ADAPTER_IMAGES,
        )
        maximum = spec.input_shapes(largest, guidance=True)
    inputs = tuple((name, ShapeRange(minimum[name], optimum[name], maximum[name])) for name in spec.input_names)
    label = size_range.label
    if spec.follows_prompt_length:
        label += f"+{max_prompt_chunks * spec.tokens_per_chunk}tok"
    if spec.reference_sides is not None:
        label += f"+ref{least}-{most}"
    return Profile(label=label, inputs=inputs)


def component_profiles(spec: ComponentSpec, ranges: Sequence[SizeRange], max_prompt_chunks: int) -> list[Profile]:
    """One profile per configured size range: the profiles one engine of the component is built with."""
    return [profile_for(spec, size_range, max_prompt_chunks) for size_range in ranges]


def profiles_label(profiles: Sequence[Profile]) -> str:
    """Names an engine by its profiles, e.g. '256-768@512x4,512x1'."""
    return ",".join(profile.label for profile in profiles)


def choose(profiles: Iterable[Profile], shapes: Mapping[str, Shape]) -> int | None:
    """Index of the covering profile closest to its optimum (the narrowest on a tie), as
    SD-WebUI-TensorRT picks engines."""
    covering = [
        (profile.distance(shapes), profile.span, index)
        for index, profile in enumerate(profiles)
        if profile.unsupported_reason(shapes) is None
    ]
    return min(covering)[2] if covering else None

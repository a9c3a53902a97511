"""Admission: a job's input in, a request the pipeline can run out, or a RequestError saying why not.

Every check of a request happens here, in one pass and in this order: the schema (types,
ranges, rules across fields), what the model's family offers, the input, mask and control
images (downloaded and decoded), the ControlNet folders against the model, the size in
pixels, and the prompts' length in the text encoders' tokens. What comes out has every
default filled in and its token and chunk counts measured; the ControlNet components it
names are listed, for the worker to give runner chains after admission.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from engine.common.downloads import limit_to_request
from engine.common.errors import RequestError
from engine.models.model import Model
from engine.pipeline import ControlImage, ImageInputs
from engine.request.entries import ControlNetEntry
from engine.request.images import ImageLimits, canny, load_image, mask_for_crop
from engine.request.limits import Limits
from engine.request.resolved import ResolvedRequest
from engine.request.schema import GenerateRequest, validate_request
from engine.serving.controlnets import ControlNetFolders
from engine.settings import Settings


@dataclass(frozen=True)
class Admitted:
    """A request with every default and count filled in, its decoded images, and the ControlNet
    components it runs (each needs a runner chain before the request runs)."""

    request: ResolvedRequest
    inputs: ImageInputs | None
    controlnets: tuple[str, ...] = ()


def model_limits(settings: Settings, model: Model) -> Limits:
    """The deployment's limits with the model's: native size, defaults and what its family takes."""
    family, config = model.family, model.config
    steps = family.steps_default(config)
    if steps is not None and "default_steps" not in settings.model_fields_set:
        settings = settings.model_copy(update={"default_steps": steps})
    return Limits.from_settings(
        settings,
        config.native_size,
        family.guidance_default(config),
        inpaint_strength=family.default_inpaint_strength,
        schedulers=family.scheduler_names,
        size_multiple=config.size_multiple,
        max_side=config.max_side,
        prompt_syntaxes=family.prompt_syntaxes,
    )


class Admission:
    """The checks one model's worker runs on every job's input."""

    def __init__(self, settings: Settings, model: Model, controlnets: ControlNetFolders):
        self.model = model
        self.controlnets = controlnets
        self.max_prompt_chunks = settings.max_prompt_chunks
        self.limits = model_limits(settings, model)
        self.image_limits = ImageLimits(
            settings.max_input_image_bytes, settings.max_image_side, settings.min_image_side
        )

    def admit(self, payload: Any) -> Admitted:
        """A valid request with its defaults, and its input image (and mask) and control images when it
        has them: the input image's size is the default size, else the first control image's."""
        draft = validate_request(payload, self.limits)
        limit_to_request(draft.timeout_s or self.limits.max_timeout_s)  # downloads end by the request's deadline
        self._check_family_features(draft)
        if self.model.config.inpainting_unet and draft.mask is None:
            raise RequestError(
                "mask: this is an inpainting model (its UNet takes the mask and the masked image as extra "
                "channels); send image and mask"
            )
        image = load_image(draft.image, self.image_limits) if draft.image is not None else None
        mask = load_image(draft.mask, self.image_limits, "mask") if draft.mask is not None else None
        if image is not None and mask is not None and draft.padding_mask_crop is not None:
            mask = mask_for_crop(mask, image.size)
        controls = tuple(
            self._control_image(control, f"controlnets[{index}]")
            for index, control in enumerate(draft.controlnets or ())
        )
        size_from = image if image is not None else controls[0].image if controls else None
        request = draft.resolved(self.limits, size_from.size if size_from is not None else None)
        inputs = ImageInputs(image, mask, controls) if image is not None or controls else None
        return Admitted(self._measure_prompts(request), inputs, tuple(control.component for control in controls))

    def _check_family_features(self, draft: GenerateRequest) -> None:
        """Refuses what the model's family does not offer yet, naming the field."""
        family = self.model.family
        unsupported = {
            "mask": draft.mask is not None and not family.inpainting,
            "controlnets": bool(draft.controlnets) and not family.controlnets,
            "loras": bool(draft.loras) and not family.lora_targets,
        }
        problems = [f"{field}: not supported for {family.name} models yet" for field, bad in unsupported.items() if bad]
        if draft.true_cfg_scale is not None and not family.true_cfg:
            problems.append(f"true_cfg_scale: only for models with distilled guidance, not {family.name}")
        if family.true_cfg and draft.negative_prompt is not None and (draft.true_cfg_scale or 1.0) <= 1.0:
            problems.append(f"negative_prompt: {family.name} models use one only with true_cfg_scale above 1")
        if problems:
            raise RequestError("; ".join(problems))

    def _control_image(self, control: ControlNetEntry, field: str) -> ControlImage:
        """A ``controlnets`` entry's component and control image (its edge map, with preprocess canny)."""
        component = self.controlnets.component(control.name, f"{field}.name")
        image = load_image(control.image, self.image_limits, f"{field}.image")
        if control.preprocess == "canny":
            image = canny(image, *control.thresholds)
        return ControlImage(component, image, control.scale, control.start, control.end)

    def _measure_prompts(self, request: ResolvedRequest) -> ResolvedRequest:
        """The request with its prompts' token and chunk counts; refuses a prompt past MAX_PROMPT_CHUNKS."""
        family = self.model.family
        fields = {"prompt": request.prompts}
        if request.negative_prompts is not None and family.classifier_free_scale(*request.guidance) is not None:
            fields["negative_prompt"] = request.negative_prompts
        limit = self.max_prompt_chunks
        lengths = {
            field: family.measure_prompts(self.model.tokenizers, texts, request.prompt_syntax)
            for field, texts in fields.items()
        }
        problems = [
            f"{field if len(found) == 1 else f'{field}[{index}]'}: {length.tokens} tokens make {length.chunks} "
            f"chunks of 75; at most {limit} ({limit * 75} tokens, MAX_PROMPT_CHUNKS)"
            for field, found in lengths.items()
            for index, length in enumerate(found)
            if length.chunks > limit
        ]
        if problems:
            raise RequestError("; ".join(problems))
        return replace(
            request,
            prompt_tokens=tuple(length.tokens for length in lengths["prompt"]),
            prompt_chunks=max(length.chunks for found in lengths.values() for length in found),
        )

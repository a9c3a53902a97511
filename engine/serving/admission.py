"""Admission: a job's input in, a request the pipeline can run out, or one RequestError naming every problem.

Every check of a request happens here, in two rounds. The first costs no download: the
schema (types, ranges, rules across fields), what the model's family offers, the mask an
inpainting model needs, the ControlNet folders against the model, the LoRA files named from
LORA_DIR (found, their headers read), the IP-Adapter files, and the prompts' length in the
text encoders' tokens. Each of these reads the fields that passed the schema on their own, so
one bad field does not hide another field's problem; a check whose field failed is skipped,
the schema has named it. Only a request that passes them all has its input, mask and control
images (and IP-Adapter image prompts) fetched and decoded, so a refusal never waits for a
download; then the size in pixels, which an input image can set. What comes out has every
default filled in and its token and chunk counts measured; the ControlNet and IP-Adapter
components it names are listed, for the worker to give runner chains after admission. LoRA
URLs are fetched, and LoRA files read whole, by the worker after admission, once the
request's memory check has passed without them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from PIL import Image

from engine.common.download_limits import limit_to_request
from engine.common.errors import Problems
from engine.lora.files import LoraFiles
from engine.lora.ip_adapters import Adapter, IpAdapterFiles
from engine.models.controlnet_folders import ControlNetFolders
from engine.models.ip_scales import layer_scales, scale_problems
from engine.models.model import Model
from engine.pipeline import ControlImage, ImageInputs
from engine.pipeline.image_prompts import ImagePrompt
from engine.prompts.syntax import PromptSyntaxError
from engine.prompts.tokens import PromptLength
from engine.request.checking import check_request
from engine.request.entries import ControlImageEntry, ControlNetEntry
from engine.request.images import ImageLimits, canny, load_image, mask_for_crop
from engine.request.ip_adapter_entry import IpAdapterEntry
from engine.request.limits import Limits
from engine.request.resolved import ResolvedRequest
from engine.request.schema import GenerateRequest
from engine.settings import Settings


@dataclass(frozen=True)
class Admitted:
    """A request with every default and count filled in, its decoded images, and the ControlNet
    components it runs (each needs a runner chain before the request runs)."""

    request: ResolvedRequest
    inputs: ImageInputs | None
    controlnets: tuple[str, ...] = ()
    adapters: tuple[Adapter, ...] = ()
    """The IP-Adapters the request names, checked, in order."""
    image_prompts: tuple[ImagePrompt, ...] = ()


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
        reference_image=family.reference_image,
        model_scheduler=model.scheduler_config["_class_name"],
    )


class Admission:
    """The checks one model's worker runs on every job's input."""

    def __init__(
        self,
        settings: Settings,
        model: Model,
        controlnets: ControlNetFolders,
        loras: LoraFiles,
        ip_adapters: IpAdapterFiles,
    ):
        self.model = model
        self.controlnets = controlnets
        self.loras = loras
        self.ip_adapters = ip_adapters
        self.max_prompt_chunks = settings.max_prompt_chunks
        self.limits = model_limits(settings, model)
        self.image_limits = ImageLimits(
            settings.max_input_image_bytes, settings.max_image_side, settings.min_image_side
        )

    def admit(self, payload: Any) -> Admitted:
        """A valid request with its defaults, and its input image (and mask) and control images when it
        has them: the input image's size is the default size, else the first control image's."""
        checked = check_request(payload, self.limits)
        fields = checked.fields
        problems = Problems(checked.problems)
        problems.found += self._family_problems(fields)
        components = self._controlnet_components(fields, problems)
        self._locate_loras(fields, problems)
        adapters = self._adapters(fields, problems)
        lengths = problems.check(self._measure_prompts, fields)
        problems.raise_any()
        draft = checked.request
        assert draft is not None and lengths is not None  # no problem: the schema gave a request
        limit_to_request(draft.timeout_s or self.limits.max_timeout_s)  # downloads end by the request's deadline
        inputs, prompts = self._load_images(draft, components, adapters)
        request = draft.resolved(self.limits, self._default_size(inputs))
        request = replace(
            request,
            prompt_tokens=tuple(length.tokens for length in lengths["prompt"]),
            prompt_chunks=max(length.chunks for found in lengths.values() for length in found),
            reference_image=self.limits.reference_image,
        )
        return Admitted(request, inputs, components, adapters, prompts)

    def _family_problems(self, fields: Mapping[str, Any]) -> list[str]:
        """What the model's family does not offer yet, and the mask an inpainting model needs, by field."""
        family = self.model.family
        unsupported = {
            "mask": fields.get("mask") is not None and not family.inpainting,
            "controlnets": bool(fields.get("controlnets")) and not family.controlnets,
            "loras": bool(fields.get("loras")) and not family.lora_targets,
            "padding_mask_crop": fields.get("padding_mask_crop") is not None and not family.mask_crop,
            "ip_adapters": bool(fields.get("ip_adapters")) and not family.ip_adapters,
        }
        problems = [f"{field}: not supported for {family.name} models yet" for field, bad in unsupported.items() if bad]
        if not family.negative_prompts:
            problems += [
                f"{field}: {family.name} models take none"
                for field in ("negative_prompt", "true_cfg_scale")
                if fields.get(field) is not None
            ]
        elif fields.get("true_cfg_scale") is not None and not family.true_cfg:
            problems.append(f"true_cfg_scale: only for models with distilled guidance, not {family.name}")
        if (
            family.true_cfg
            and fields.get("negative_prompt") is not None
            and "true_cfg_scale" in fields
            and (fields["true_cfg_scale"] or 1.0) <= 1.0
        ):
            problems.append(f"negative_prompt: {family.name} models use one only with true_cfg_scale above 1")
        if family.inpainting_model(self.model.config) and "mask" in fields and fields["mask"] is None:
            problems.append(
                "mask: this is an inpainting model (its denoiser takes the mask and the masked image as extra "
                "channels); send image and mask"
            )
        takes_image = family.image_to_image or family.inpainting or family.reference_image
        if not takes_image and fields.get("image") is not None:
            problems.append(f"image: {family.name} models take no input image")
        if family.reference_image and "image" in fields and fields["image"] is None:
            problems.append(f"image: {family.name} models edit an image; send image")
        if family.reference_image and fields.get("strength") is not None:
            problems.append(f"strength: {family.name} models take none (image is the reference to edit)")
        if fields.get("control") is not None and not family.control_image:
            problems.append("control: only for Flux Control models (Canny, Depth); ControlNets go in controlnets")
        if family.control_image and "control" in fields and fields["control"] is None:
            problems.append(
                "control: this is a Flux Control model (its transformer takes a control image's latents as "
                "extra channels); send control with the edge or depth map"
            )
        return problems

    def _controlnet_components(self, fields: Mapping[str, Any], problems: Problems) -> tuple[str, ...]:
        """The model's component for each ``controlnets`` entry, each entry's problem kept in ``problems``."""
        entries: list[ControlNetEntry] = fields.get("controlnets") or []
        if not self.model.family.controlnets:
            return ()  # the family check names the field
        found = [
            problems.check(self.controlnets.check, entry.name, f"controlnets[{index}].name")
            for index, entry in enumerate(entries)
        ]
        return tuple(component for component in found if component is not None)

    def _locate_loras(self, fields: Mapping[str, Any], problems: Problems) -> None:
        """Each LoRA named from LORA_DIR found and its header read, its problem kept in ``problems``; URLs
        are fetched (and LoRA files read whole) after admission, once the memory check has passed."""
        if not self.model.family.lora_targets:
            return  # the family check names the field
        for index, entry in enumerate(fields.get("loras") or ()):
            if entry.name is not None:
                problems.check(self.loras.locate, entry.name, f"loras[{index}].name")

    def _adapters(self, fields: Mapping[str, Any], problems: Problems) -> tuple[Adapter, ...]:
        """Each ``ip_adapters`` entry's file, checked against the model, and its per-block scales against the
        UNet; each entry's problems kept in ``problems``."""
        entries: list[IpAdapterEntry] = fields.get("ip_adapters") or []
        if not self.model.family.ip_adapters:
            return ()  # the family check names the field
        found = [
            problems.check(self.ip_adapters.resolve, entry.name, f"ip_adapters[{index}].name")
            for index, entry in enumerate(entries)
        ]
        for index, entry in enumerate(entries):
            problems.found += scale_problems(entry.scale, self.model.meta_unet, f"ip_adapters[{index}].scale")
        return tuple(adapter for adapter in found if adapter is not None)

    def _measure_prompts(self, fields: Mapping[str, Any]) -> dict[str, list[PromptLength]]:
        """Each prompt's (and each negative prompt's the family encodes) token and chunk counts; refuses
        a prompt past MAX_PROMPT_CHUNKS. A field that failed the schema, or whose weights it could not
        read, is not measured: the schema named it."""
        family = self.model.family
        if "prompt_syntax" not in fields:
            return {}
        prompts, negatives = fields.get("prompt"), fields.get("negative_prompt")
        texts = {"prompt": prompts} if prompts is not None else {}
        guidance = fields.get("guidance_scale"), fields.get("true_cfg_scale")
        if negatives is not None and {"guidance_scale", "true_cfg_scale"} <= fields.keys():
            scale = self.limits.default_guidance_scale if guidance[0] is None else guidance[0]
            if family.classifier_free_scale(scale, guidance[1], True) is not None:
                texts["negative_prompt"] = negatives  # as sent: one serves every prompt, named once
        syntax = fields.get("prompt_syntax") or self.limits.prompt_syntaxes[0]
        lengths = {}
        for field, found in texts.items():
            try:
                lengths[field] = family.measure_prompts(self.model.tokenizers, found, syntax)
            except PromptSyntaxError:
                continue
        limit = self.max_prompt_chunks
        Problems(
            f"{field if len(found) == 1 else f'{field}[{index}]'}: {length.tokens} tokens make {length.chunks} "
            f"chunks of 75; at most {limit} ({limit * 75} tokens, MAX_PROMPT_CHUNKS)"
            for field, found in lengths.items()
            for index, length in enumerate(found)
            if length.chunks > limit
        ).raise_any()
        return lengths

    def _load_images(
        self, draft: GenerateRequest, components: tuple[str, ...], adapters: tuple[Adapter, ...]
    ) -> tuple[ImageInputs | None, tuple[ImagePrompt, ...]]:
        """The input image, mask, control images and image prompts, decoded (control images through their
        preprocessing); every one that cannot be read is named in one RequestError."""
        problems = Problems()
        image = problems.check(load_image, draft.image, self.image_limits) if draft.image is not None else None
        mask = problems.check(load_image, draft.mask, self.image_limits, "mask") if draft.mask is not None else None
        if image is not None and mask is not None and draft.padding_mask_crop is not None:
            mask = problems.check(mask_for_crop, mask, image.size)
        controls = [
            problems.check(self._control_image, entry, component, f"controlnets[{index}]")
            for index, (entry, component) in enumerate(zip(draft.controlnets or (), components, strict=True))
        ]
        control = problems.check(self._preprocessed, draft.control, "control") if draft.control is not None else None
        prompts = [
            self._image_prompt(entry, adapter, index, problems)
            for index, (entry, adapter) in enumerate(zip(draft.ip_adapters or (), adapters, strict=True))
        ]
        problems.raise_any()
        image_prompts = tuple(prompt for prompt in prompts if prompt is not None)
        if image is None and not controls and control is None:
            return None, image_prompts
        return ImageInputs(image, mask, tuple(found for found in controls if found is not None), control), image_prompts

    def _image_prompt(
        self, entry: IpAdapterEntry, adapter: Adapter, index: int, problems: Problems
    ) -> ImagePrompt | None:
        """An ``ip_adapters`` entry's images, decoded, with its adapter's components and a scale per layer."""
        field = f"ip_adapters[{index}].image" if entry.image is not None else f"ip_adapters[{index}].images"
        sources = entry.prompts
        named = [field] if entry.image is not None else [f"{field}[{number}]" for number in range(len(sources))]
        images = [
            problems.check(load_image, source, self.image_limits, name)
            for source, name in zip(sources, named, strict=True)
        ]
        if any(image is None for image in images):
            return None
        side = self.model.specs[adapter.encoder].inputs[0].shape[-1]
        assert isinstance(side, int)
        return ImagePrompt(
            adapter.encoder,
            adapter.projection,
            tuple(image for image in images if image is not None),
            layer_scales(entry.scale, self.model.meta_unet),
            adapter.layout.hidden_states,
            side,
        )

    def _preprocessed(self, entry: ControlImageEntry, field: str) -> Image.Image:
        """A control image as given, or its edge map with preprocess canny."""
        image = load_image(entry.image, self.image_limits, f"{field}.image")
        return canny(image, *entry.thresholds) if entry.preprocess == "canny" else image

    def _control_image(self, control: ControlNetEntry, component: str, field: str) -> ControlImage:
        """A ``controlnets`` entry's control image (its edge map, with preprocess canny)."""
        image = self._preprocessed(control, field)
        return ControlImage(component, image, control.scale, control.start, control.end)

    def _default_size(self, inputs: ImageInputs | None) -> tuple[int, int] | None:
        """The size a request without width and height takes: its input image's (Flux Kontext's: the
        preferred resolution its reference is resized to), else its control image's."""
        if inputs is None:
            return None
        if inputs.image is not None:
            return self.model.family.size_for_image(*inputs.image.size)
        if inputs.control is not None:
            return inputs.control.size
        return inputs.controls[0].image.size

"""What a model family is: its components, their specs, their torch modules, its prompt encoding.

A family (Stable Diffusion 1.x/2.x, SDXL) differs from another only in the components
it has and in how a prompt becomes the UNet's conditioning inputs. The denoising loop,
the backends, the export stage and the engine store are the same for every family.
The model folder's configs a family reads are in ``engine.models.config``.
"""

from __future__ import annotations

import importlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from engine.models.config import ModelConfig
from engine.models.modules import GUIDANCE_EMBEDDING, weights_variant
from engine.prompts.syntax import PromptSyntax
from engine.prompts.tokens import PromptLength, WeightedTokens, prompt_lengths, tokenize_prompt
from engine.schedulers import CLASSIC_SCHEDULERS
from engine.spec import ComponentSpec

Encode = Callable[[str, Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]]
"""Runs one component by name on named inputs; how the family reaches its text encoders."""


LCM_STEPS = 4
LCM_GUIDANCE_SCALE = 8.5
"""diffusers' ``LatentConsistencyModelPipeline`` defaults, for a UNet distilled with a guidance embedding."""


@dataclass(frozen=True)
class LoraTarget:
    """Where a component's part of a LoRA file lives, and where its parameters are in our module."""

    prefix: str
    """The key prefix in diffusers' layout: ``unet``, ``text_encoder``, ``text_encoder_2``."""
    module_prefix: str
    """The component's module inside the wrapper the backends run (``unet.``, ``encoder.``)."""
    is_unet: bool


@dataclass(frozen=True)
class PromptBatch:
    """The prompts of one request, one entry per distinct prompt."""

    prompts: Sequence[str]
    negative_prompts: Sequence[str] | None
    images_per_prompt: int
    guidance: bool
    height: int
    width: int
    syntax: PromptSyntax = "a1111"

    def texts(self, with_negatives: bool) -> list[str]:
        """The texts to encode: with classifier-free guidance, the negatives ("" where none) first."""
        prompts = list(self.prompts)
        if not with_negatives:
            return prompts
        return list(self.negative_prompts or [""] * len(prompts)) + prompts


class ModelFamily(ABC):
    """One kind of diffusers pipeline, described for every stage of the worker."""

    name: str
    pipeline_classes: tuple[str, ...]
    text_encoders: tuple[str, ...]
    tokenizers: tuple[str, ...]
    default_guidance_scale: float
    default_inpaint_strength: float

    components: tuple[str, ...] = ()
    """Components that are exported and run by a backend, in pipeline order."""
    denoiser: str = "unet"
    """The component each denoising step runs."""
    scheduler_names: tuple[str, ...] = CLASSIC_SCHEDULERS
    """Names a request's ``scheduler`` may take for this family."""
    prompt_syntaxes: tuple[PromptSyntax, ...] = ("a1111", "plain")
    """How the family can read a prompt; the first is the default."""
    inpainting: bool = True
    controlnets: bool = True
    ip_adapters: bool = True
    """Whether requests may add image prompts through IP-Adapters (UNet families: SD and SDXL)."""
    negative_prompts: bool = True
    """Whether the family's pipeline takes a negative prompt (Flux Fill's and Control's take none)."""
    mask_crop: bool = True
    """Whether inpainting takes ``padding_mask_crop``."""
    image_to_image: bool = True
    """Whether an input image without a mask means image-to-image."""
    control_image: bool = False
    """Whether the denoiser takes a control image's latents as extra channels (Flux Canny and Depth)."""
    reference_image: bool = False
    """Whether ``image`` is a reference the denoiser reads beside the latents (Flux Kontext)."""
    reference_pixels: int = 0
    """The most pixels such a reference is prepared at."""
    inpaint_encodes_image: bool = False
    """Whether inpainting encodes the input image even at full strength, drawing from the first
    generator (Flux Fill's pipeline does; SD's skips it)."""

    def size_for_image(self, width: int, height: int) -> tuple[int, int]:
        """The size (width, height) an input image of this size is prepared at, and a request without one
        takes: the image's own (Flux Kontext's: its preferred resolution nearest the image's aspect ratio)."""
        return width, height

    def inpainting_model(self, config: ModelConfig) -> bool:
        """Whether the denoiser takes the mask and the masked image as extra channels (requests send both)."""
        return config.inpainting_unet

    def inpaint_channels(self, mask: torch.Tensor, masked_latents: torch.Tensor, vae_scale_factor: int) -> torch.Tensor:
        """The denoiser's extra inpainting channels from the mask at image size and the masked image's
        latents: SD's inpainting UNet takes the mask resized to the latent, then the latents."""
        resized = torch.nn.functional.interpolate(mask, size=masked_latents.shape[2:])
        return torch.cat([resized, masked_latents], dim=1)

    def first_step(self, steps: int, strength: float) -> int:
        """The step image-to-image starts from: the last ``strength`` of the schedule, rounded as the
        family's img2img pipeline rounds it (SD's: the steps run are ``int(steps * strength)``)."""
        return steps - min(int(steps * strength), steps)

    samples_image_once = False
    """Whether img2img samples the image's latent once, with the first generator, for every image."""
    true_cfg = False
    """Whether guidance is distilled into the model, and classifier-free guidance is ``true_cfg_scale``."""

    def timestep_options(
        self, config: ModelConfig, scheduler: Any, steps: int, latent_shape: tuple[int, ...]
    ) -> dict[str, Any]:
        """Extra arguments of the scheduler's ``set_timesteps`` for an image of this latent shape."""
        return {}

    def guidance_default(self, config: ModelConfig) -> float:
        """The default ``guidance_scale``, which can depend on the checkpoint (Flux dev or schnell; an
        LCM-distilled UNet: diffusers' ``LatentConsistencyModelPipeline`` default)."""
        return LCM_GUIDANCE_SCALE if config.guidance_embedding_dim else self.default_guidance_scale

    def steps_default(self, config: ModelConfig) -> int | None:
        """The checkpoint's own default step count where it has one (Flux schnell, an LCM-distilled UNet: 4)."""
        return LCM_STEPS if config.guidance_embedding_dim else None

    def classifier_free_scale(
        self, guidance_scale: float, true_cfg_scale: float | None, has_negatives: bool
    ) -> float | None:
        """The scale of classifier-free guidance (negatives batched with the prompts), or None without it."""
        return guidance_scale if guidance_scale > 1.0 else None

    def denoiser_inputs(self, config: ModelConfig, guidance_scale: float) -> dict[str, torch.Tensor]:
        """Inputs of the denoiser besides latents, timestep and text: an LCM-distilled UNet's guidance
        embedding, of ``guidance_scale - 1`` as diffusers' SD and SDXL pipelines make it (Flux dev's
        embedded guidance in its own family)."""
        dim = config.guidance_embedding_dim
        return {} if dim is None else {GUIDANCE_EMBEDDING: guidance_scale_embedding(guidance_scale - 1, dim)}

    @abstractmethod
    def specs(self, config: ModelConfig) -> dict[str, ComponentSpec]:
        """One spec per component, with sizes read from the model's configs."""

    @abstractmethod
    def torch_module(self, component: str, folder: Path, dtype: torch.dtype, weights: bool = True) -> torch.nn.Module:
        """The module that export traces and the torch backend runs: tensors in, a tuple out.

        Without ``weights`` it is built from the configs on the meta device: its parameters'
        names and shapes, for nothing.
        """

    lora_targets: ClassVar[Mapping[str, LoraTarget]] = {}
    """Components a LoRA file can change, with where their part is in the file and in the module."""

    @property
    def lora_loader(self) -> Any:
        """The diffusers LoRA loader mixin whose ``lora_state_dict`` reads this family's LoRA files."""
        raise NotImplementedError(f"{self.name} has no LoRA support")

    def tokenize(
        self, tokenizers: Mapping[str, Any], texts: Sequence[str], syntax: PromptSyntax
    ) -> dict[str, list[WeightedTokens]]:
        """Each text in chunks of tokens with their weights, by each of the family's tokenizers."""
        return {name: [tokenize_prompt(tokenizers[name], text, syntax) for text in texts] for name in self.tokenizers}

    def measure_prompts(
        self, tokenizers: Mapping[str, Any], texts: Sequence[str], syntax: PromptSyntax
    ) -> list[PromptLength]:
        """Each text's tokens and chunks; raises RequestError for one the family cannot read."""
        return prompt_lengths(self.tokenize(tokenizers, texts, syntax))

    @abstractmethod
    def encode_prompt(
        self, encode: Encode, tokenizers: Mapping[str, Any], batch: PromptBatch, config: ModelConfig
    ) -> dict[str, torch.Tensor]:
        """The UNet's conditioning inputs for the whole batch, unconditional rows first."""

    def component_precision(self, component: str, precision: str, config: ModelConfig) -> str:
        """The precision a component runs at. A checkpoint stored in bf16 (Flux's, SD 3.5's) runs in bf16
        where fp16 was asked for: its weights and activations were made for bf16's range, which fp16
        lacks, and on the GPUs this worker targets the two are equally fast. A family can also keep an
        overflow-prone part in fp32."""
        if precision == "fp16" and config.checkpoint_dtype(self.weight_folder(component)) == torch.bfloat16:
            return "bf16"
        return precision

    def weight_folder(self, component: str) -> str:
        """Model subfolder whose weights and config a component is built from."""
        return "vae" if component.startswith("vae") else component


def guidance_scale_embedding(scale: float, dim: int) -> torch.Tensor:
    """One row of diffusers' ``get_guidance_scale_embedding``: sines then cosines of ``scale * 1000``
    at ``dim // 2`` frequencies, zero-padded to an odd ``dim``."""
    half = dim // 2
    frequencies = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    angles = (torch.tensor([scale], dtype=torch.float32) * 1000.0)[:, None] * frequencies[None, :]
    return torch.nn.functional.pad(torch.cat([torch.sin(angles), torch.cos(angles)], dim=1), (0, dim % 2))


def repeat_for_images(embeddings: torch.Tensor, images_per_prompt: int) -> torch.Tensor:
    """Rows per prompt become rows per image, in diffusers' order (p0, p0, p1, p1...)."""
    return embeddings.repeat_interleave(images_per_prompt, dim=0)


def load_pretrained(folder: Path, subfolder: str, dtype: torch.dtype, weights: bool = True) -> torch.nn.Module:
    """Loads one component with the class that the folder's model_index.json names (or, without
    ``weights``, builds it from its config on the meta device)."""
    index = json.loads((folder / "model_index.json").read_text())
    library, class_name = index[subfolder]
    cls = getattr(importlib.import_module(library), class_name)
    if not weights:
        with torch.device("meta"):
            if hasattr(cls, "load_config"):  # a diffusers model
                return cls.from_config(cls.load_config(folder / subfolder)).eval()
            return cls(cls.config_class.from_pretrained(folder / subfolder)).eval()
    variant = weights_variant(folder / subfolder, dtype)
    module = cls.from_pretrained(folder / subfolder, torch_dtype=dtype, variant=variant)
    return module.eval().requires_grad_(False)

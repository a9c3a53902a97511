"""Helpers that run the worker's pipeline and diffusers' own pipeline on the same request."""

from __future__ import annotations

import base64
import inspect
import io
from pathlib import Path

import diffusers
import numpy as np
import torch
from PIL import Image

from engine.backends.chain import ChainCalls
from engine.common.metrics import StageTimer
from engine.serving.worker import Worker

TOLERANCE = 2  # of 255, per pixel

DIFFUSERS_SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "euler_trailing": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    "euler_a_trailing": ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}),
    "dpmpp_2m_sde_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "dpmpp_sde": ("DPMSolverSDEScheduler", {}),
    "dpmpp_sde_karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
}
"""The request's scheduler names as diffusers' documentation maps the samplers, kept apart from the
worker's own table so the reference does not inherit its mistakes."""
DIFFUSERS_CALL_OPTIONS = {"tcd": {"eta": 0.3}}
"""Pipeline arguments the schedulers' own examples pass (diffusers' TCD examples: ``eta=0.3``)."""


def bf16_flux(cache_dir: Path, target: Path) -> Path:
    """tiny-flux as Black Forest Labs ship Flux: transformer and T5 stored in bf16, CLIP and the VAE in fp32."""
    from engine.models.builtin import builtin_model_folder

    pipe = diffusers.FluxPipeline.from_pretrained(builtin_model_folder("tiny-flux", cache_dir))
    pipe.transformer.to(torch.bfloat16)
    pipe.text_encoder_2.to(torch.bfloat16)
    pipe.save_pretrained(target)
    return target


def held_out_flux_transformer(config: dict, seed: int) -> torch.nn.Module:
    """A Flux transformer unlike the built-ins' over ``config``'s channels: no guidance embedding, two
    double-stream and two single-stream blocks, three heads, other rotary axes; random from ``seed``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return diffusers.FluxTransformer2DModel.from_config(
            {
                **config,
                "guidance_embeds": False,
                "num_layers": 2,
                "num_single_layers": 2,
                "num_attention_heads": 3,
                "attention_head_dim": 8,
                "axes_dims_rope": (2, 2, 4),
            }
        )


def as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth picture with some texture, like a photo rather than noise."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    texture = np.random.default_rng(seed).random((height, width)) * 0.2
    pixels = np.stack([x, y, 0.5 + texture], axis=-1).clip(0, 1)
    return Image.fromarray((pixels * 255).astype(np.uint8))


def to_base64(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def cpu_worker(model: str, cache_dir: Path, engine_dir: Path, backend: str = "torch", **settings) -> Worker:
    """A worker on the CPU for ``model`` with its own engine store."""
    from engine.settings import Settings

    return Worker(
        Settings(model=model, cache_dir=cache_dir, engine_dir=engine_dir, device="cpu", backend=backend, **settings)
    )


def diffusers_pipe(cls, worker: Worker, **extra):
    """diffusers' pipeline ``cls`` on the worker's model folder, quiet, without the safety checker where
    the pipeline has one (the worker has none, and the tiny folders hold none)."""
    if "safety_checker" in inspect.signature(cls.__init__).parameters:
        extra.setdefault("safety_checker", None)
    pipe = cls.from_pretrained(worker.model.folder, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def decoded(response: dict) -> list[np.ndarray]:
    """A successful response's images, as arrays."""
    assert response["status"] == "success", response
    return [as_array(Image.open(io.BytesIO(base64.b64decode(item["image"])))) for item in response["output"]]


def generate(worker: Worker, payload: dict) -> list[np.ndarray]:
    request, inputs = worker.resolve(payload)
    prepared = worker.pipeline.prepare_images(inputs, request) if inputs else None
    seeds = [payload["seed"] + i for i in range(request.num_images)]
    calls = ChainCalls(worker.chains)
    return [as_array(i) for i in worker.pipeline(request, seeds, calls, StageTimer(worker.device), None, prepared)]


def reference_images(pipe, worker: Worker, payload: dict, **extra) -> list[np.ndarray]:
    """diffusers' pipeline (text-to-image, image-to-image or inpainting, with ControlNets or a Flux Control
    image where the payload has them, as it asks) with the same inputs."""
    request, images = worker.resolve(payload)
    folder_config = diffusers.DDIMScheduler.load_config(worker.model.folder, subfolder="scheduler")
    class_name, overrides = DIFFUSERS_SCHEDULERS.get(request.scheduler, (folder_config["_class_name"], {}))
    seeds = [payload["seed"] + i for i in range(request.num_images)]
    if class_name == "DPMSolverSDEScheduler":  # its Brownian noise: one tree per image, from the image's seed
        overrides = {**overrides, "noise_sampler_seed": seeds}
    pipe.scheduler = getattr(diffusers, class_name).from_config(folder_config, **overrides)
    inputs: dict = {"height": request.height, "width": request.width}
    if images is not None and images.image is not None and images.mask is None:
        inputs = {"image": images.image, "strength": request.strength}
    elif images is not None and images.image is not None:
        inputs |= {"image": images.image, "mask_image": images.mask, "strength": request.strength}
        if "padding_mask_crop" in inspect.signature(pipe.__call__).parameters:  # Flux Fill's has none
            inputs["padding_mask_crop"] = request.padding_mask_crop
    if images is not None and images.control is not None:
        inputs["control_image"] = images.control
    if images is not None and images.controls:
        # diffusers' ControlNet pipelines take lists for several ControlNets, plain values for one
        def per_controlnet(values: list) -> object:
            return values if len(values) > 1 else values[0]

        controls = images.controls
        inputs["image" if images.image is None else "control_image"] = per_controlnet([c.image for c in controls])
        inputs["controlnet_conditioning_scale"] = per_controlnet([c.scale for c in controls])
        inputs["control_guidance_start"] = per_controlnet([c.start for c in controls])
        inputs["control_guidance_end"] = per_controlnet([c.end for c in controls])
    if request.negative_prompts is not None:
        inputs["negative_prompt"] = request.negative_prompts
    if request.true_cfg_scale is not None:
        inputs["true_cfg_scale"] = request.true_cfg_scale
    if "strength" not in inspect.signature(pipe.__call__).parameters:  # Flux Kontext's image is a reference
        inputs.pop("strength", None)
    if "height" in inspect.signature(pipe.__call__).parameters:  # SD's img2img pipeline takes the image's size
        inputs |= {"height": request.height, "width": request.width}
    result = pipe(
        prompt=request.prompts,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance_scale,
        num_images_per_prompt=request.images_per_prompt,
        generator=[torch.Generator().manual_seed(seed) for seed in seeds],
        **inputs,
        **({"eta": request.eta} if request.eta is not None else DIFFUSERS_CALL_OPTIONS.get(request.scheduler, {})),
        **extra,
    )
    return [as_array(image) for image in result.images]


def assert_same_images(ours: list[np.ndarray], theirs: list[np.ndarray]) -> None:
    assert len(ours) == len(theirs)
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine.shape == reference.shape
        assert np.abs(mine - reference).max() <= TOLERANCE
        assert reference.std() > 1  # a real image, not a blank that trivially matches

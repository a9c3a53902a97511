"""The denoising loop (``loop``, its steps in ``denoise``), the images it takes (``preparation``) and its
latent space (``latents``)."""

from engine.pipeline.denoise import StepCallback
from engine.pipeline.loop import DiffusionPipeline
from engine.pipeline.preparation import ControlImage, ImageInputs

__all__ = ["ControlImage", "DiffusionPipeline", "ImageInputs", "StepCallback"]

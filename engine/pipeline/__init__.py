"""The denoising loop (``loop``), the images it takes (``preparation``) and its latent space (``latents``)."""

from engine.pipeline.loop import DiffusionPipeline, StepCallback
from engine.pipeline.preparation import ControlImage, ImageInputs

__all__ = ["ControlImage", "DiffusionPipeline", "ImageInputs", "StepCallback"]

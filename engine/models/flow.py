"""What the flow-matching transformer families (SD3, Flux) share: a T5 encoder kept in fp32, plain-text
prompts measured in T5 tokens, the flow-matching scheduler, and img2img's rounding of ``strength``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from engine.models.config import ModelConfig
from engine.models.family import ModelFamily
from engine.prompts.syntax import PromptSyntax
from engine.prompts.tokens import PromptLength
from engine.schedulers import FLOW_SCHEDULERS


class FlowMatchingFamily(ModelFamily):
    denoiser = "transformer"
    scheduler_names = FLOW_SCHEDULERS
    prompt_syntaxes: tuple[PromptSyntax, ...] = ("plain",)
    inpainting = False
    controlnets = False
    ip_adapters = False
    """Flux's IP-Adapter (XLabs' layout) adds its image tokens in the transformer's blocks through its own
    processors and encoder; SD3's is a different design again. Neither is the UNet's cross-attention."""
    default_inpaint_strength = 1.0
    t5: tuple[str, str]
    """The T5 encoder's component and tokenizer."""

    def component_precision(self, component: str, precision: str, config: ModelConfig) -> str:
        """T5's activations overflow fp16, so it runs in bf16 (from a bf16 checkpoint, or when bf16 is
        asked for) or else in fp32."""
        resolved = super().component_precision(component, precision, config)
        return "fp32" if component == self.t5[0] and resolved == "fp16" else resolved

    def first_step(self, steps: int, strength: float) -> int:
        """SD3's and Flux's img2img pipelines round the skipped steps down (SD's rounds the steps run down)."""
        return int(max(steps - min(steps * strength, steps), 0))

    def measure_prompts(
        self, tokenizers: Mapping[str, Any], texts: Sequence[str], syntax: PromptSyntax
    ) -> list[PromptLength]:
        """T5's token count, the longest reading of the prompt; CLIP's reading is cut at 77 tokens."""
        t5 = tokenizers[self.t5[1]]
        return [PromptLength(len(t5(text, add_special_tokens=False).input_ids), 1) for text in texts]


def flow_shift(scheduler: Any, patches: int) -> float:
    """The resolution-dependent shift (``mu``) for an image of ``patches`` tokens, from the scheduler's config."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    settings = scheduler.config
    return calculate_shift(
        patches,
        settings.get("base_image_seq_len", 256),
        settings.get("max_image_seq_len", 4096),
        settings.get("base_shift", 0.5),
        settings.get("max_shift", 1.15),
    )

"""Against diffusers' community ``lpw_stable_diffusion`` pipeline, where a copy of it is at hand.

The community pipelines are not in the diffusers wheel and are not fetched at test time:
point ``LPW_PIPELINES_DIR`` at a folder holding ``lpw_stable_diffusion.py`` from diffusers'
``examples/community`` to run this comparison. Its parser predates BREAK, so BREAK is left
out here (``test_long_prompts`` covers it), and so are prompts of one chunk: lpw encodes those
through ``text_encoder.text_model``, which transformers 5 no longer has. ``lpw_stable_diffusion_xl`` is not compared:
it hard-codes CLIP's BOS and EOS ids (49406, 49407), which a tiny tokenizer does not have,
weights by moving tokens away from the last token's embedding instead of keeping the mean,
and does not pad its last chunk to 77 tokens.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.prompts.conftest import conditioning

FOLDER = Path(os.environ.get("LPW_PIPELINES_DIR", "/nonexistent"))
pytestmark = pytest.mark.skipif(
    not (FOLDER / "lpw_stable_diffusion.py").is_file(),
    reason="set LPW_PIPELINES_DIR to a folder with diffusers' examples/community/lpw_stable_diffusion.py",
)

PROMPTS = [
    ("a (red:1.4) fox in the [snow]", "blurry, (low quality:1.2), ((jpeg artifacts)), [cropped], out of frame, " * 2),
    (
        "(a watercolor painting:1.3) of a ((lighthouse)) on a rocky coast at dusk, [seagulls] over the waves, "
        "warm light in the windows, (fishing boats:0.7) in the harbor, clouds lit orange and violet, fine detail",
        "(low quality:1.2), [[jpeg artifacts]]",
    ),
    ("a fox", "(ugly, deformed, extra limbs:1.3), " * 4),
]


def lpw_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lpw_stable_diffusion", FOLDER / "lpw_stable_diffusion.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("prompt", "negative"), PROMPTS)
def test_sd_weighted_long_prompts_match_lpw(sd, prompt, negative):
    worker, pipe = sd
    ours = conditioning(worker, prompt, negative)["encoder_hidden_states"]
    with torch.no_grad():
        positive, unconditional = lpw_module().get_weighted_text_embeddings(
            pipe, prompt, uncond_prompt=negative, max_embeddings_multiples=3
        )
    assert ours.shape[1] == positive.shape[1]
    torch.testing.assert_close(ours, torch.cat([unconditional, positive]), rtol=0, atol=1e-5)

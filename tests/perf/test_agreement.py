"""The GPU tests' image bound, on CPU images whose differences are known: a LoRA and another prompt with
another guidance fail it, the precision stand-in (bf16 against fp32) passes it."""

from __future__ import annotations

import numpy as np
import pytest

from perf.agreement import compare_images, decode
from perf.lora_files import write_pair


@pytest.fixture(scope="module")
def made(cache_dir, tmp_path_factory):
    """The tiny model's images, as the GPU tests request them, from the torch backend on the CPU."""
    from engine.models.model import load_model
    from engine.serving.worker import Worker
    from engine.settings import Settings

    loras = tmp_path_factory.mktemp("loras")
    write_pair(load_model("tiny", cache_dir), loras, rank=4)

    def worker(**settings):
        engines = tmp_path_factory.mktemp("engines")
        return Worker(Settings(cache_dir=cache_dir, engine_dir=engines, device="cpu", backend="torch", **settings))

    def image(chosen, payload):
        response = chosen.handle({"id": "a", "input": payload})
        assert response["status"] == "success", response
        return decode(response["output"][0])

    fp32, bf16 = worker(lora_dir=loras), worker(precision="bf16")
    base = {"prompt": "a fox", "num_inference_steps": 6, "seed": 4, "scheduler": "euler"}
    return {
        "base": image(fp32, base),
        "bf16": image(bf16, base),
        "lora": image(fp32, {**base, "loras": [{"name": "a", "scale": 0.9}, {"name": "b", "scale": 0.5}]}),
        "prompt": image(fp32, {**base, "prompt": "a cat on a sofa", "guidance_scale": 5.0}),
    }


def test_the_precision_stand_in_passes_the_fp16_bound(made):
    diff = compare_images(made["bf16"], made["base"], "fp16")
    assert diff.passed, diff
    assert diff.max_abs > 0, "bf16 rounds differently: the bound is not passed by identical images"


@pytest.mark.parametrize("changed", ["lora", "prompt"])
def test_a_lora_or_another_prompt_fails_the_bounds(made, changed):
    """fp32 and fp16's bounds; bf16's is for tiny-flux at 512x512, where another prompt moves pixels by
    80/255 (perf/agreement.py), and is looser than these two changes to the tiny SD model."""
    for precision in ("fp32", "fp16"):
        diff = compare_images(made[changed], made["base"], precision)
        assert not diff.passed, (precision, diff)
    assert compare_images(made[changed], made["base"]).psnr_db > 24, "the old PSNR check would have passed it"


def test_images_of_other_shapes_are_refused():
    with pytest.raises(ValueError, match="shapes differ"):
        compare_images(np.zeros((8, 8, 3)), np.zeros((8, 4, 3)))

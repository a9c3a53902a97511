"""Held-out model folders with their own IP-Adapters, served by ``handler.py --rp_serve_api`` with ``MODEL``
set to the folder, as a client sends requests: JSON with base64 image prompts.

Neither folder is a built-in's: the SD 1.x one has three blocks of other widths, two layers per block,
other head counts and a 24-wide text encoder; the SDXL one has three blocks, three transformer layers
in its last block and mid block, 16- and 24-wide text encoders (cross-attention 40) and its own
text-time embedding widths. Each has a plain and a Plus adapter written for its UNet's
cross-attention layers, beside a CLIP image encoder of its own shape, all from seeds no other test
uses. The images that come back over HTTP, on torch and on onnxruntime, must match diffusers' own
pipeline on the same folder after ``load_ip_adapter`` and ``set_ip_adapter_scale`` within 2/255; an
adapter made for the other folder's UNet is refused by its field, and the server answers on.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from PIL import Image

from engine.models.builtin_parts import byte_tokenizer, clip_text_encoder, sd_scheduler, small_vae
from engine.models.model import load_model
from perf.ip_adapter_files import write_adapter
from tests.conftest import ROOT, export_command, runsync, serve_api, worker_env
from tests.ip_adapter.conftest import image_prompt, load_adapters, to_base64
from tests.lora.conftest import image_of
from tests.parity import TOLERANCE

PIPELINES = {"sd": StableDiffusionPipeline, "xl": StableDiffusionXLPipeline}
ENCODERS = {
    "sd": {"hidden_size": 40, "intermediate_size": 56, "projection_dim": 20, "num_hidden_layers": 2}
    | {"num_attention_heads": 2, "image_size": 40, "patch_size": 10},
    "xl": {"hidden_size": 48, "intermediate_size": 64, "projection_dim": 28, "num_hidden_layers": 2}
    | {"num_attention_heads": 4, "image_size": 56, "patch_size": 14},
}
"""Each folder's CLIP vision encoder: widths, input sizes and depths unlike perf's and the other tests'."""
PAYLOAD = {"prompt": "a harbour in the fog", "seed": 64, "num_inference_steps": 2, "width": 64, "height": 64}
GUIDANCE = {"sd": 6.0, "xl": 4.5}
SCALES = (0.35, 0.8)
ONE_THREAD = "1"
"""Torch threads per process: the servers and the references share the cores, and at these sizes threads
only wait on each other."""
EXPORTED = ("text_encoder", "text_encoder_2", "vae_decoder")
"""What an image-prompt request runs besides the adapter's components and the IP denoiser, which export adds."""


def sd_folder(folder: Path) -> Path:
    """SD 1.x's layout at other sizes: cross-attention in the two outer blocks, 24 wide."""
    tokenizer = byte_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(24, 48, 48),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=(3, 6, 6),
        norm_num_groups=8,
    )
    StableDiffusionPipeline(
        vae=small_vae(),
        text_encoder=clip_text_encoder(tokenizer, hidden=24),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(folder)
    return folder


def xl_folder(folder: Path) -> Path:
    """SDXL's layout at other sizes: three transformer layers in the last block, text-time embeds of 4."""
    tokenizer, tokenizer_2 = byte_tokenizer(), byte_tokenizer()
    tokenizer_2.pad_token = "!"
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(16, 32, 48),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 3),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        transformer_layers_per_block=(1, 1, 3),
        projection_class_embeddings_input_dim=6 * 4 + 24,
        cross_attention_dim=16 + 24,
        norm_num_groups=8,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    StableDiffusionXLPipeline(
        vae=small_vae(scaling_factor=0.13025, force_upcast=True),
        text_encoder=clip_text_encoder(tokenizer, hidden=16),
        text_encoder_2=clip_text_encoder(tokenizer_2, hidden=24, with_projection=True),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def held_out(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``models/{sd,xl}``: the folders; ``adapters/{sd,xl}/``: each one's plain and Plus files and encoder."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    root = tmp_path_factory.mktemp("ip-held-out-models")
    with torch.random.fork_rng():
        for seed, (name, build) in enumerate((("sd", sd_folder), ("xl", xl_folder)), start=61):
            torch.manual_seed(seed)
            model = load_model(str(build(root / "models" / name)), cache_dir)
            adapters = root / "adapters" / name
            CLIPVisionModelWithProjection(CLIPVisionConfig(**ENCODERS[name])).eval().save_pretrained(
                adapters / "image_encoder"
            )
            for kind, offset in (("plain", 10), ("plus", 20)):
                write_adapter(model, adapters / f"{kind}.safetensors", kind, seed + offset, ENCODERS[name])
    return root


@contextmanager
def serve(held_out: Path, cache_dir: Path, name: str, backend: str, engine_dir: Path) -> Iterator[str]:
    """The SDK's local API server for folder ``name`` on ``backend``, with every folder's adapters."""
    model = str(held_out / "models" / name)
    adapters = str(held_out / "adapters")
    env = worker_env(
        cache_dir, engine_dir, MODEL=model, BACKEND=backend, IP_ADAPTER_DIR=adapters, OMP_NUM_THREADS=ONE_THREAD
    )
    with serve_api(env, engine_dir.parent / f"{name}-{backend}.log") as (url, _):
        yield url


@pytest.fixture(scope="module")
def servers(held_out: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Both folders on torch; the SDXL one on onnxruntime too, from graphs exported for it and its Plus adapter
    (the export runs while the torch servers start)."""
    store = tmp_path_factory.mktemp("ip-held-out-store") / "engines"
    folder = str(held_out / "models" / "xl")
    command, env = export_command(store, cache_dir, "--model", folder, "--skip-engines", "--components", *EXPORTED)
    command += ["--ip-adapters", "xl/plus"]
    env |= {"IP_ADAPTER_DIR": str(held_out / "adapters"), "OMP_NUM_THREADS": ONE_THREAD}
    with ExitStack() as stack:
        export = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stack.callback(export.kill)
        urls = {
            f"{name}/torch": stack.enter_context(
                serve(held_out, cache_dir, name, "torch", tmp_path_factory.mktemp(f"ip-{name}") / "engines")
            )
            for name in PIPELINES
        }
        _, errors = export.communicate(timeout=600)
        assert export.returncode == 0, errors[-3000:]
        urls["xl/onnxruntime"] = stack.enter_context(serve(held_out, cache_dir, "xl", "onnxruntime", store))
        yield urls


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """diffusers' references on one thread too, as the servers run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(int(ONE_THREAD))
    yield
    torch.set_num_threads(threads)


def served(url: str, payload: dict) -> dict:
    body = runsync(url, payload, timeout=300).json()
    assert body["status"] == "COMPLETED", body
    return body["output"]


def diffusers_images(held_out: Path, name: str, kind: str, image: Image.Image) -> list[np.ndarray]:
    """diffusers' pipeline on the folder with the adapter loaded, at each of ``SCALES``."""
    pipe = load_adapters(
        PIPELINES[name].from_pretrained(held_out / "models" / name), held_out / "adapters", name, kind, SCALES[0]
    )
    images = []
    for scale in SCALES:
        pipe.set_ip_adapter_scale(scale)
        result = pipe(
            PAYLOAD["prompt"],
            num_inference_steps=PAYLOAD["num_inference_steps"],
            width=PAYLOAD["width"],
            height=PAYLOAD["height"],
            guidance_scale=GUIDANCE[name],
            generator=torch.Generator().manual_seed(PAYLOAD["seed"]),
            ip_adapter_image=image,
        )
        images.append(np.asarray(result.images[0], dtype=np.int16))
    return images


CASES = [
    ("sd/torch", "plain", 91),
    ("sd/torch", "plus", 92),
    ("xl/torch", "plain", 93),
    ("xl/torch", "plus", 94),
    ("xl/onnxruntime", "plus", 95),
]
"""The server (folder and backend), the adapter's kind and the image prompt's seed."""


@pytest.mark.parametrize(("server", "kind", "seed"), CASES)
def test_held_out_folders_adapters_through_the_api_match_diffusers(servers, held_out, server, kind, seed):
    name, backend = server.split("/")
    url = servers[server]
    payload = {**PAYLOAD, "guidance_scale": GUIDANCE[name]}
    image = image_prompt(seed, size=72)
    references = diffusers_images(held_out, name, kind, image)
    assert np.abs(references[0] - references[1]).max() > 4 * TOLERANCE, "the scale must change the image to mean much"
    for scale, reference in zip(SCALES, references, strict=True):
        entry = {"name": f"{name}/{kind}", "image": to_base64(image), "scale": scale}
        output = served(url, {**payload, "ip_adapters": [entry]})
        difference = np.abs(image_of(output) - reference).max()
        assert difference <= TOLERANCE, f"{difference}/255 from diffusers at scale {scale}"
        assert output["metrics"]["ip_adapters"][0]["kind"] == kind
        assert set(output["metrics"]["backends"].values()) == {backend}, output["metrics"]


@pytest.mark.parametrize(("name", "other"), [("sd", "xl"), ("xl", "sd")])
def test_an_adapter_for_the_other_folder_is_refused_and_the_server_answers_on(servers, name, other):
    url = servers[f"{name}/torch"]
    image = to_base64(image_prompt(96, size=72))
    body = runsync(url, {**PAYLOAD, "ip_adapters": [{"name": f"{other}/plain", "image": image}]}).json()
    assert body["status"] == "FAILED", body
    assert f"ip_adapters[0].name: '{other}/plain': made for another model" in body["error"], body["error"]
    assert "cross-attention width" in body["error"], body["error"]
    assert "Traceback" not in body["error"], body["error"]
    assert served(url, PAYLOAD)["status"] == "success"

"""The RunPod entry point as RunPod's SDK runs it: --test_input and the local API server."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from collections.abc import Iterator

import pytest
from PIL import Image

from engine.models.model import load_model
from perf.lora_files import write_lora
from tests.conftest import ROOT, runsync, serve_api, worker_env


def run_test_input(payload: dict, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "handler.py", "--test_input", json.dumps(payload)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def job_result(stdout: str) -> dict:
    """In local test mode stdout is the response alone, as one JSON line (logs go to stderr)."""
    [line] = stdout.splitlines()
    return json.loads(line)


def decode_image(item: dict) -> Image.Image:
    assert not item["image"].startswith("data:")
    return Image.open(io.BytesIO(base64.b64decode(item["image"], validate=True)))


def assert_metrics(metrics: dict) -> None:
    for key in (
        "process_time",
        "num_samples",
        "image_size",
        "request_id",
        "backends",
        "stages_ms",
        "unet_step_ms",
        "cold_start",
        "peak_memory_mb",
    ):
        assert key in metrics, key
    for stage in ("text_encoder", "denoise", "vae_decode", "postprocess"):
        assert metrics["stages_ms"][stage] >= 0
    assert set(metrics["unet_step_ms"]) >= {"p50", "p95", "max"}
    assert metrics["backends"] == {"text_encoder": "torch", "unet": "torch", "vae_decoder": "torch"}


def test_test_input_generates_a_png_with_metrics(subprocess_env):
    payload = {"input": {"prompt": "a red fox", "width": 64, "height": 96, "num_inference_steps": 6, "seed": 7}}
    done = run_test_input(payload, subprocess_env)
    assert done.returncode == 0, done.stderr[-2000:]
    result = job_result(done.stdout)
    assert result["status"] == "success"
    [item] = result["output"]
    image = decode_image(item)
    assert (image.format, image.size) == ("PNG", (64, 96))
    assert (item["seed"], item["width"], item["height"], item["format"]) == (7, 64, 96, "png")
    assert_metrics(result["metrics"])
    assert result["metrics"]["image_size"] == "64x96"
    assert result["metrics"]["cold_start"] is True
    assert result["metrics"]["init_ms"]["total"] > 0


def test_test_input_with_a_bad_width_fails_naming_width(subprocess_env):
    payload = {"input": {"prompt": "a red fox", "width": 65, "height": 96}}
    done = run_test_input(payload, subprocess_env)
    assert done.returncode != 0
    assert job_result(done.stdout)["error"] == "width: must be a multiple of 8, got 65"


@pytest.fixture(scope="module")
def api_server(cache_dir, tmp_path_factory) -> Iterator[str]:
    """The SDK's local API server (``--rp_serve_api``) running the real handler, with one LoRA and one
    ControlNet in their folders."""
    from tests.test_controlnet import make_controlnet

    engine_dir = tmp_path_factory.mktemp("api") / "engines"
    lora_dir = engine_dir.parent / "loras"
    controlnet_dir = engine_dir.parent / "controlnets"
    model = load_model("tiny", cache_dir)
    write_lora(model, lora_dir / "style.safetensors", "kohya", seed=3, rank=4, alpha=2)
    make_controlnet(model.folder, controlnet_dir / "edges", seed=1)
    env = worker_env(cache_dir, engine_dir, LORA_DIR=str(lora_dir), MAX_LORAS="2", CONTROLNET_DIR=str(controlnet_dir))
    with serve_api(env, engine_dir.parent / "server.log") as (url, _):
        yield url


def test_api_server_answers_runsync(api_server):
    response = runsync(
        api_server, {"prompt": "a red fox", "width": 64, "height": 96, "num_inference_steps": 6, "seed": 7}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "COMPLETED"
    output = body["output"]
    assert output["status"] == "success"
    assert decode_image(output["output"][0]).size == (64, 96)
    assert_metrics(output["metrics"])
    assert output["metrics"]["request_id"] == body["id"]


def test_api_server_keeps_answering_after_bad_requests(api_server):
    """The same worker answers after bad requests: its job after them is not a cold start, whichever
    test made the server's first job."""
    first = runsync(api_server, {"prompt": "first", "num_inference_steps": 2, "seed": 1}).json()
    assert first["status"] == "COMPLETED"
    for bad in ({"prompt": "x", "width": 65}, {"width": 64}, {"prompt": "x", "scheduler": "nope"}):
        body = runsync(api_server, bad).json()
        assert body["status"] == "FAILED"
        assert ":" in body["error"] and "Traceback" not in body["error"]
    body = runsync(api_server, {"prompt": "still here", "num_inference_steps": 3, "seed": 1}).json()
    assert body["status"] == "COMPLETED"
    assert body["output"]["metrics"]["cold_start"] is False


MALFORMED_LORAS = [
    ([{"name": "../../etc/passwd"}], "loras[0].name: must name a file inside the LoRA folder"),
    ([{"name": "style"}, {"name": "nope"}], "loras[1].name: no LoRA named 'nope'"),
    ([{"name": "style", "scale": 9}], "loras[0].scale: Input should be less than or equal to 4"),
    ([{"name": "style"}] * 3, "loras: at most 2 LoRAs per request, got 3"),
    ([{"url": "http://169.254.169.254/latest/x.safetensors"}], "loras[0].url: URL not allowed"),
    ([{"name": "style.ckpt"}], "loras[0].name: .ckpt files are refused"),
    ([{"name": "style", "weight": 1}], "loras[0].weight: Extra inputs are not permitted"),
]


def test_api_server_serves_loras_and_refuses_malformed_entries(api_server):
    payload = {"prompt": "a lighthouse", "num_inference_steps": 3, "seed": 2, "width": 64, "height": 64}
    base = runsync(api_server, payload).json()["output"]
    for loras, message in MALFORMED_LORAS:
        body = runsync(api_server, {**payload, "loras": loras}).json()
        assert body["status"] == "FAILED", body
        assert message in body["error"] and "Traceback" not in body["error"]
    styled = runsync(api_server, {**payload, "loras": [{"name": "style", "scale": 0.9}]}).json()["output"]
    assert styled["metrics"]["loras"][0]["name"] == "style" and styled["metrics"]["lora_ms"] > 0
    assert styled["output"][0]["image"] != base["output"][0]["image"]
    again = runsync(api_server, payload).json()["output"]
    assert again["output"][0]["image"] == base["output"][0]["image"], "the base weights are back, exactly"


MALFORMED_PROMPTS = [
    ({"prompt": "a (fox:high) in snow"}, "prompt: the weight in '(…:high)' is not a number"),
    ({"prompt": "a fox", "negative_prompt": "(blur:5)"}, "negative_prompt: the weight of 'blur' is 5, outside ±3"),
    ({"prompt": ["a fox", "a (cat:-4)"]}, "prompt[1]: the weight of 'cat' is -4, outside ±3"),
    ({"prompt": "a fox " * 60}, "prompt: 240 tokens make 4 chunks of 75; at most 3 (225 tokens, MAX_PROMPT_CHUNKS)"),
    ({"prompt": "a BREAK b BREAK c BREAK d"}, "prompt: 4 tokens make 4 chunks of 75; at most 3"),
    ({"prompt": "a fox", "prompt_syntax": "compel"}, "prompt_syntax: Input should be 'a1111' or 'plain'"),
]


def test_api_server_reads_weighted_and_long_prompts_and_names_malformed_ones(api_server):
    base = {"num_inference_steps": 2, "seed": 3, "width": 64, "height": 64}
    for payload, message in MALFORMED_PROMPTS:
        body = runsync(api_server, {**base, **payload}).json()
        assert body["status"] == "FAILED", body
        assert message in body["error"] and "Traceback" not in body["error"], body["error"]
    for unbalanced in ("a ((fox in [snow", "a fox) in] snow:", "\\\\(literal\\\\)"):
        body = runsync(api_server, {**base, "prompt": unbalanced}).json()
        assert body["status"] == "COMPLETED", body
    long = runsync(api_server, {**base, "prompt": "a (red:1.2) fox BREAK in the [snow], " + "x " * 100}).json()
    assert long["status"] == "COMPLETED", long
    assert long["output"]["metrics"]["prompt_chunks"] == 3
    assert long["output"]["metrics"]["prompt_tokens"] == [117]


def test_api_server_inpaints_and_names_malformed_masks(api_server):
    from tests.parity import picture, to_base64

    image = to_base64(picture(64, 64))
    base = {"prompt": "a red hat", "num_inference_steps": 2, "seed": 4, "image": image}
    for payload, message in (
        ({"prompt": "x", "mask": image}, "mask: needs an image, the picture to inpaint"),
        ({**base, "mask": "bm90IGFuIGltYWdl"}, "mask: not a PNG, JPEG or WebP image"),
        ({**base, "padding_mask_crop": 4}, "padding_mask_crop: only applies with a mask"),
    ):
        body = runsync(api_server, payload).json()
        assert body["status"] == "FAILED", body
        assert message in body["error"] and "Traceback" not in body["error"], body["error"]
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 8, 40, 40))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    body = runsync(api_server, {**base, "mask": base64.b64encode(buffer.getvalue()).decode()}).json()
    assert body["status"] == "COMPLETED", body
    assert body["output"]["metrics"]["mode"] == "inpaint"


def test_api_server_serves_controlnets_and_names_malformed_entries(api_server):
    from tests.parity import picture, to_base64

    photo = to_base64(picture(64, 64))
    base = {"prompt": "a red hat", "num_inference_steps": 2, "seed": 4}
    edges = {"name": "edges", "image": photo}
    for controlnets, message in (
        ([{**edges, "name": "pose"}], "controlnets[0].name: no ControlNet 'pose' in CONTROLNET_DIR"),
        ([{**edges, "image": "bm90IGFuIGltYWdl"}], "controlnets[0].image: not a PNG, JPEG or WebP image"),
        ([{**edges, "start": 0.5, "end": 0.5}], "controlnets[0]: start must be below end"),
        ([edges, edges, edges], "controlnets: at most 2 per request (MAX_CONTROLNETS), got 3"),
        ([{**edges, "preprocess": "sobel"}], "controlnets[0].preprocess:"),
        ([{"image": photo}], "controlnets[0].name: Field required"),
    ):
        body = runsync(api_server, {**base, "controlnets": controlnets}).json()
        assert body["status"] == "FAILED", body
        assert message in body["error"] and "Traceback" not in body["error"], body["error"]
    body = runsync(api_server, {**base, "controlnets": [{**edges, "preprocess": "canny", "end": 0.5}]}).json()
    assert body["status"] == "COMPLETED", body
    metrics = body["output"]["metrics"]
    assert metrics["mode"] == "txt2img+controlnet"
    assert metrics["controlnets"][0]["name"] == "edges" and metrics["controlnets"][0]["steps"] >= 1


def test_api_server_names_every_problem_of_a_request_in_one_error(api_server):
    """Problems the schema finds, the prompt's length in tokens, and a ControlNet folder, in one reply."""
    from tests.parity import picture, to_base64

    photo = to_base64(picture(64, 64))
    payload = {
        "prompt": "a fox " * 60,
        "scheduler": "nope",
        "mask": photo,
        "loras": [{"name": "style", "scale": 9}],
        "controlnets": [{"name": "pose", "image": photo}],
    }
    body = runsync(api_server, payload).json()
    assert body["status"] == "FAILED", body
    error = body["error"]
    assert error.startswith("scheduler: must be one of") and "Traceback" not in error, error
    for message in (
        "mask: needs an image, the picture to inpaint",
        "loras[0].scale: Input should be less than or equal to 4",
        "controlnets[0].name: no ControlNet 'pose' in CONTROLNET_DIR",
        "prompt: 240 tokens make 4 chunks of 75; at most 3 (225 tokens, MAX_PROMPT_CHUNKS)",
    ):
        assert error.count(f"; {message}") == 1, (message, error)

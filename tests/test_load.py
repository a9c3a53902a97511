"""The local API server under a few hundred requests: concurrent, valid and malformed.

Every valid request must succeed with the images it asked for, every malformed one
must fail with a clear 'field: rule' error and no traceback, and the server's memory
must stay flat.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from engine.request.schema import GenerateRequest
from engine.schedulers import CLASSIC_SCHEDULERS
from tests.conftest import runsync, serve_api, worker_env
from tests.parity import picture
from tests.test_hostile import PATHOLOGICAL_PROMPT, b64, mask, over_pixel_limit, png_bytes, text_bomb

FIELDS = [
    "prompt",
    "negative_prompt",
    "width",
    "height",
    "num_inference_steps",
    "guidance_scale",
    "seed",
    "num_images",
    "scheduler",
    "output_format",
    "quality",
    "timeout_s",
]
ANY_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6,
)
VALID = st.fixed_dictionaries(
    {"prompt": st.text(min_size=1, max_size=40) | st.lists(st.text(max_size=10), min_size=1, max_size=2)},
    optional={
        "width": st.sampled_from([64, 72, 96]),
        "height": st.sampled_from([64, 80]),
        "num_inference_steps": st.integers(1, 3),
        "seed": st.integers(0, 2**40),
        "scheduler": st.sampled_from(CLASSIC_SCHEDULERS),
        "output_format": st.sampled_from(["png", "jpeg", "webp"]),
        "guidance_scale": st.floats(0, 12),
    },
)
INVALID_VALUES = {
    "prompt": [None, 5, [], {}, [5], "x" * 10_001],
    "negative_prompt": [5, {}, [5]],
    "width": [-1, 0, 65, 10**9, "x", 2.5, True],
    "height": [-1, 0, 65, 10**9, "x", 2.5, True],
    "num_inference_steps": [0, -1, 10**9, "x", 2.5, True],
    "guidance_scale": [-1, 51, "x", [], True],
    "seed": [-1, "x", 2.5, 2**70, True],
    "num_images": [0, -1, 10**9, "x", True],
    "scheduler": ["x", 5, []],
    "output_format": ["bmp", 5],
    "quality": [0, 101, "x", 2.5],
    "timeout_s": [0, -1, 10**9, "x"],
}
"""Values each field must refuse, by the documented rules (not by asking the validator)."""
HOSTILE_PAYLOADS = [
    {"prompt": "x", "image": "http://a:CUDA driver/x.png"},
    {"prompt": "x", "loras": [{"url": "https://a:illegal memory access/x.safetensors"}]},
    {"prompt": "x", "loras": [{"name": "."}]},
    {"prompt": "x", "loras": [{"name": "a\x00b"}]},
    {"prompt": "x", "image": b64(text_bomb())},
    {"prompt": "x", "image": b64(over_pixel_limit())},
    {"prompt": "x", "image": b64(png_bytes(picture(64, 64))), "mask": mask((64, 64), None), "padding_mask_crop": 8},
    {"prompt": [PATHOLOGICAL_PROMPT] * 2},
]
"""Issue 23's hostile inputs that need no server of their own (tests/test_hostile.py has them all): each
is sent once among the concurrent requests, and drawn among the malformed ones."""
MALFORMED = st.one_of(
    # prompt is required, and unknown fields are refused
    st.dictionaries(st.sampled_from([*FIELDS[1:], "steps", "image_size", ""]), ANY_JSON, max_size=5),
    # a valid request with one field broken
    VALID.flatmap(
        lambda base: st.sampled_from(FIELDS).flatmap(
            lambda field: st.sampled_from(INVALID_VALUES[field]).map(lambda bad, field=field: {**base, field: bad})
        )
    ),
    st.sampled_from(HOSTILE_PAYLOADS),
)
"""Requests that break a rule by construction: each must fail."""


@pytest.fixture(scope="module")
def server(cache_dir, tmp_path_factory) -> Iterator[tuple[str, psutil.Process]]:
    engine_dir = tmp_path_factory.mktemp("load") / "engines"
    env = worker_env(cache_dir, engine_dir, DEFAULT_STEPS="2", MAX_IMAGES="2", MAX_PROMPTS="2", BACKEND="torch")
    with serve_api(env, engine_dir.parent / "server.log") as (url, process):
        yield url, psutil.Process(process.pid)


def expected_images(payload: dict) -> int:
    prompts = payload["prompt"] if isinstance(payload["prompt"], list) else [payload["prompt"]]
    return len(prompts) * payload.get("num_images", 1)


def check_valid(url: str, payload: dict) -> None:
    body = runsync(url, payload).json()
    assert body["status"] == "COMPLETED", (payload, body)
    output = body["output"]["output"]
    assert len(output) == expected_images(payload)
    image = Image.open(io.BytesIO(base64.b64decode(output[0]["image"])))
    assert image.size == (payload.get("width", 64), payload.get("height", 64))


def check_rejected(url: str, payload: object) -> None:
    response = runsync(url, payload)
    if not isinstance(payload, dict):
        assert response.status_code == 422  # the SDK's own API takes only JSON objects as input
        return
    body = response.json()
    assert body["status"] == "FAILED", (payload, body)
    error = body["error"]
    assert "Traceback" not in error and "internal error" not in error, error
    assert field_rule_form(payload).fullmatch(error), f"not 'field: rule; field: rule': {error!r}"


def field_rule_form(payload: dict) -> re.Pattern[str]:
    """'field: rule', joined by '; ', where a field is one the request schema has or the payload sent
    (``loras[0].url``, ``input`` for the request as a whole) and a rule is text that runs to the next problem."""
    names = sorted({*GenerateRequest.model_fields, *map(str, payload), "input"} - {""}, key=len, reverse=True)
    field = r"(?:{})(?:\[\d+\]|\.\w+)*".format("|".join(map(re.escape, names)))
    problem = rf"{field}: (?:(?!; {field}: ).)*\S"
    return re.compile(f"{problem}(?:; {problem})*", re.DOTALL)


def rss_mb(process: psutil.Process) -> float:
    return process.memory_info().rss / 2**20


def test_a_few_hundred_requests_concurrent_and_malformed(server):
    url, process = server
    for seed in range(30):  # warm up allocators and caches before measuring memory
        check_valid(url, {"prompt": "warm", "seed": seed, "num_images": 1 + seed % 2})
    baseline = rss_mb(process)

    @settings(max_examples=120, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(valid=VALID)
    def valid_requests(valid):
        check_valid(url, valid)

    @settings(max_examples=150, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(payload=MALFORMED | ANY_JSON)
    def malformed_requests(payload):
        check_rejected(url, payload)

    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = [pool.submit(check_valid, url, {"prompt": f"fox {i}", "seed": i}) for i in range(40)]
        concurrent += [pool.submit(check_rejected, url, {"prompt": "x", "width": 65 + 8 * i}) for i in range(20)]
        concurrent += [pool.submit(check_rejected, url, payload) for payload in HOSTILE_PAYLOADS]
        valid_requests()
        malformed_requests()
        for future in concurrent:
            future.result()

    growth = rss_mb(process) - baseline
    assert growth < 100, f"server memory grew by {growth:.0f} MB over the run"
    check_valid(url, {"prompt": "still serving"})


def test_a_request_past_its_timeout_fails_and_the_next_succeeds(server):
    url, _ = server
    body = runsync(url, {"prompt": "slow", "num_inference_steps": 40, "timeout_s": 0.01}).json()
    assert body["status"] == "FAILED" and body["error"].startswith("timeout_s: the request passed its 0.01 s deadline")
    check_valid(url, {"prompt": "quick"})


def test_a_non_json_body_is_refused_by_the_sdk_and_the_server_goes_on(server):
    url, _ = server
    response = requests.post(
        url + "/runsync", data=b"{not json", headers={"Content-Type": "application/json"}, timeout=30
    )
    assert response.status_code == 422
    check_valid(url, {"prompt": "after garbage"})

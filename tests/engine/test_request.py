"""Request validation: every broken rule is named with its field, defaults are filled in."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from engine.common.errors import RequestError
from engine.request.checking import parse_request
from engine.request.limits import Limits
from engine.schedulers import FLOW_SCHEDULERS, SCHEDULER_NAMES

LIMITS = Limits(
    native_size=512,
    default_steps=25,
    default_guidance_scale=7.5,
    min_side=64,
    max_side=1024,
    max_pixels=768 * 768,
    max_steps=50,
    max_images=4,
    max_prompts=2,
    max_timeout_s=60.0,
)


def errors_of(payload) -> str:
    with pytest.raises(RequestError) as caught:
        parse_request(payload, LIMITS)
    return str(caught.value)


def test_defaults_come_from_the_model_and_the_deployment():
    request = parse_request({"prompt": "a fox"}, LIMITS)
    assert (request.width, request.height, request.steps, request.guidance_scale) == (512, 512, 25, 7.5)
    assert request.prompts == ["a fox"] and request.negative_prompts is None
    assert request.num_images == 1 and request.output_format == "png"
    assert request.timeout_s == 60.0


def test_one_negative_prompt_applies_to_every_prompt():
    request = parse_request({"prompt": ["a", "b"], "negative_prompt": "c", "num_images": 2}, LIMITS)
    assert request.negative_prompts == ["c", "c"]
    assert request.num_images == 4


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({}, "prompt: Field required"),
        ({"prompt": 3}, "prompt: must be a string or a list of strings"),
        ({"prompt": []}, "prompt: must not be an empty list"),
        ({"prompt": ["a", "b", "c"]}, "prompt: at most 2 prompts"),
        ({"prompt": "a", "width": 65}, "width: must be a multiple of 8, got 65"),
        ({"prompt": "a", "height": 2048}, "height: must be 64 to 1024, got 2048"),
        ({"prompt": "a", "width": "512"}, "width: Input should be a valid integer"),
        ({"prompt": "a", "width": 512.0}, "width: Input should be a valid integer"),
        ({"prompt": "a", "width": 1024, "height": 1024}, "width: width x height must be at most 589824"),
        ({"prompt": "a", "num_inference_steps": 0}, "num_inference_steps: must be 1 to 50, got 0"),
        ({"prompt": "a", "num_inference_steps": 51}, "num_inference_steps: must be 1 to 50"),
        ({"prompt": "a", "num_images": 0}, "num_images: Input should be greater than or equal to 1"),
        ({"prompt": "a", "num_images": 5}, "num_images: must be 1 to 4, got 5"),
        ({"prompt": ["a", "b"], "num_images": 3}, "num_images: num_images x prompts must be at most 4"),
        ({"prompt": "a", "scheduler": "k_lms"}, "scheduler: must be one of"),
        ({"prompt": "a", "output_format": "gif"}, "output_format: Input should be 'png', 'jpeg' or 'webp'"),
        ({"prompt": "a", "guidance_scale": "high"}, "guidance_scale: Input should be a valid number"),
        ({"prompt": "a", "seed": -1}, "seed: Input should be greater than or equal to 0"),
        ({"prompt": "a", "seed": True}, "seed: Input should be a valid integer"),
        ({"prompt": "a", "timeout_s": 61}, "timeout_s: must be at most 60"),
        ({"prompt": "a", "quality": 0}, "quality: Input should be greater than or equal to 1"),
        ({"prompt": "a", "steps": 20}, "steps: Extra inputs are not permitted"),
        (
            {"prompt": ["a", "b"], "negative_prompt": ["x", "y", "z"]},
            "negative_prompt: must be one string or one per prompt",
        ),
        ([1, 2], "input: must be a JSON object"),
        ("a fox", "input: must be a JSON object"),
        (None, "input: must be a JSON object"),
    ],
)
def test_each_rule_names_its_field(payload, expected):
    assert expected in errors_of(payload)


def test_all_problems_are_listed_together():
    message = errors_of({"prompt": 1, "width": 65, "num_inference_steps": 0, "colour": "red"})
    for field in ("prompt:", "width:", "num_inference_steps:", "colour:"):
        assert field in message


def test_every_scheduler_name_is_accepted():
    for name in SCHEDULER_NAMES:
        assert parse_request({"prompt": "a", "scheduler": name}, LIMITS).scheduler == name


def test_every_problem_is_reported_in_one_round():
    """Rules across fields are checked on the fields that are valid, even when others are not."""
    message = errors_of(
        {"prompt": ["a", "b"], "negative_prompt": ["x", "y", "z"], "num_images": 3, "width": 65, "quality": 0}
    )
    for expected in (
        "width: must be a multiple of 8, got 65",
        "quality: Input should be greater than or equal to 1",
        "negative_prompt: must be one string or one per prompt",
        "num_images: num_images x prompts must be at most 4, got 6",
    ):
        assert expected in message, message
    assert "strength: only applies with an image" in errors_of({"prompt": "a", "strength": 0.5, "steps": 3})


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"prompt": "a \ud800 fox"}, "prompt: holds an unpaired surrogate"),
        ({"prompt": ["a fox", "\udfff"]}, "prompt[1]: holds an unpaired surrogate"),
        ({"prompt": "a fox", "loras": [{"name": "style\udc80"}]}, "loras[0].name: holds an unpaired surrogate"),
    ],
)
def test_text_that_is_not_unicode_is_refused_by_its_place(payload, expected):
    """JSON can carry a lone UTF-16 surrogate; the tokenizers raise on one, so it must stop at validation."""
    assert errors_of(payload).startswith(expected)


def test_a_deeply_nested_payload_is_walked_without_recursion():
    nested: list = []
    for _ in range(100_000):
        nested = [nested]
    assert "holds an unpaired surrogate" not in errors_of({"prompt": "a fox", "loras": nested})


def readme_scheduler_rows() -> list[tuple[str, list[str]]]:
    """The README's scheduler table: each row's name and the names it says are also accepted."""
    text = (Path(__file__).parents[2] / "README.md").read_text()
    table = text.split("| Name | diffusers scheduler | Also accepted |")[1].split("\n\n")[0]
    rows = [line.split(" | ") for line in table.strip().splitlines()[1:]]
    return [(row[0].strip("| `"), re.findall(r"`([^`]+)`", row[2])) for row in rows]


def test_the_readme_table_lists_every_scheduler_and_its_aliases_resolve():
    rows = readme_scheduler_rows()
    assert [name for name, _ in rows] == list(SCHEDULER_NAMES)
    for name, aliases in rows:
        limits = replace(LIMITS, schedulers=FLOW_SCHEDULERS) if name in FLOW_SCHEDULERS else LIMITS
        for alias in aliases:
            assert parse_request({"prompt": "a", "scheduler": alias}, limits).scheduler == name, alias


@pytest.mark.parametrize("typed", ["dpmpp_2m + karras", "DPM++ 2M KARRAS", "  Euler A ", "UNI-PC", "euler_a normal"])
def test_scheduler_names_are_read_in_any_case_and_spelling(typed):
    assert parse_request({"prompt": "a", "scheduler": typed}, LIMITS).scheduler in SCHEDULER_NAMES


@pytest.mark.parametrize("typed", ["euler_a karras", "dpmpp_3m_sde", "karras", "lcm_trailing", "dpm++"])
def test_an_unknown_scheduler_is_refused_with_the_names_it_could_be(typed):
    message = errors_of({"prompt": "a", "scheduler": typed})
    assert message.startswith("scheduler: must be one of ddim, ddpm,") and f"got '{typed}'" in message
    assert "tcd" in message and "DPM++ 2M Karras" in message


def test_a_huge_scheduler_name_is_refused_without_being_quoted_back():
    message = errors_of({"prompt": "a", "scheduler": "+" * 1_000_000})
    assert message.startswith("scheduler: ") and "64 characters" in message
    assert len(message) < 200, "the refusal (and the worker's log line) must not carry the request's megabyte"


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (
            {"prompt": "a", "k" * 1_000_000: 1},
            "'kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk'... (1000000 characters): Extra",
        ),
        ({"prompt": "a", "x\x00\ny": 1}, "'x\\x00\\ny': Extra inputs are not permitted"),
        ({"prompt": "a", "loras": [{"name": "a", "sc\rale": 1}]}, "loras[0].'sc\\rale': Extra inputs"),
        (
            {
                "prompt": "a",
                "ip_adapters": [{"name": "a", "image": "x", "scale": {"down": {"block_" + "9" * 10**5: 1}}}],
            },
            "ip_adapters[0].scale.down.'block_9999999999999999999999999999999999'... (100006 characters): blocks",
        ),
        ({"prompt": "a", "ip_adapters": [{"name": "a", "image": "x", "scale": {"up\x1b[2J": 1}}]}, "ip_adapters[0]"),
    ],
)
def test_a_key_the_caller_made_up_is_named_escaped_and_cut_short(payload, expected):
    """Keys are echoed in refusals (and the worker's log line): one of a megabyte, or with control characters
    (a NUL, a line break, a terminal escape), is quoted with them escaped and cut to 40 characters."""
    message = errors_of(payload)
    assert message.startswith(expected), message
    assert len(message) < 300 and message.isprintable(), message

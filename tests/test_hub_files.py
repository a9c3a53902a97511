"""The RunPod Hub's files (.runpod/hub.json, .runpod/tests.json) against the settings the worker reads, and
tests.json's requests run through the handler as RunPod's SDK runs it, on the CPU with the tiny model."""

from __future__ import annotations

import json
import re
from enum import Enum
from pathlib import Path
from typing import Any, get_args

import pytest

from engine.common.errors import ConfigError
from engine.settings import Settings, load_settings
from tests.conftest import ROOT, runsync, serve_api, worker_env

HUB = json.loads((ROOT / ".runpod" / "hub.json").read_text())
TESTS = json.loads((ROOT / ".runpod" / "tests.json").read_text())
ENV = {entry["key"]: entry["input"] for entry in HUB["config"]["env"]}

READ_BY_LIBRARIES = {"HF_TOKEN"}
"""Variables the worker reads through a library: huggingface_hub's token for gated downloads."""
HUB_DEFAULTS = {"MODEL"}
"""Defaults the Hub sets on purpose apart from the image's: the image reads a folder on the network volume, a
Hub endpoint usually has none, so the Hub's default is a hub id."""
CATEGORIES = {"audio", "embedding", "image", "language", "video"}
INPUT_TYPES = {"string": (str, Path, Enum), "number": (int, float), "boolean": (bool,)}


def image_env() -> dict[str, str]:
    """The Dockerfile's ENV defaults, which a Hub endpoint starts from."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    found = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            found.update(re.findall(r"([A-Z_]+)=(\S+)", line))
    return found


def field_types(name: str) -> tuple[type, ...]:
    annotation = Settings.model_fields[name].annotation
    types = get_args(annotation) or (annotation,)
    return tuple(t for t in types if t is not type(None))


def test_hub_json_has_the_publishing_guides_shape():
    assert {"title", "description", "type", "category", "config"} <= set(HUB)
    assert HUB["type"] == "serverless" and HUB["category"] in CATEGORIES
    config = HUB["config"]
    assert config["runsOn"] == "GPU" and config["gpuCount"] == 1 and config["containerDiskInGb"] >= 20
    assert all(re.fullmatch(r"\d+\.\d+", version) for version in config["allowedCudaVersions"])
    for entry in config["env"]:
        assert set(entry) == {"key", "input"}
        assert (
            {"name", "type", "description"}
            <= set(entry["input"])
            <= {"name", "type", "description", "default", "options", "advanced"}
        )
        assert entry["input"]["type"] in INPUT_TYPES
        for option in entry["input"].get("options", []):
            assert set(option) == {"label", "value"}
    assert len(ENV) == len(config["env"]), "a variable is listed twice"
    for preset in config["presets"]:
        assert preset["name"] and set(preset["defaults"]) <= set(ENV)


def test_every_listed_variable_is_one_the_worker_reads_with_the_type_it_parses():
    for key, entry in ENV.items():
        if key in READ_BY_LIBRARIES:
            continue
        name = key.lower()
        assert name in Settings.model_fields, f"{key} is listed but the worker does not read it"
        assert any(issubclass(t, INPUT_TYPES[entry["type"]]) for t in field_types(name)), key
        if entry["type"] == "number":
            assert not any(t is bool for t in field_types(name)), key


def test_every_required_setting_is_listed():
    required = {name.upper() for name, info in Settings.model_fields.items() if info.is_required()}
    assert required | {"MODEL"} <= set(ENV)


def test_listed_defaults_and_options_are_what_the_image_uses_and_accepts():
    image = image_env()
    base = {"device": "cpu"}
    for key, entry in ENV.items():
        if key in READ_BY_LIBRARIES:
            continue
        name = key.lower()
        if "default" in entry:
            listed = getattr(load_settings(**base, **{name: entry["default"]}), name)
            if key not in HUB_DEFAULTS:
                effective = load_settings(**base, **({name: image[key]} if key in image else {}))
                assert listed == getattr(effective, name), f"{key}: the Hub's default is not the image's"
        values = [option["value"] for option in entry.get("options", [])]
        for value in values:
            load_settings(**base, **{name: value})
        enum = next((t for t in field_types(name) if issubclass(t, Enum)), None)
        if enum is not None:
            assert set(values) == {member.value for member in enum}, f"{key}: options differ from what it accepts"


def test_a_bad_listed_value_is_refused_by_name():
    with pytest.raises(ConfigError, match="PRECISION"):
        load_settings(device="cpu", precision="fp8")


def test_tests_json_has_the_publishing_guides_shape():
    assert TESTS["tests"]
    for test in TESTS["tests"]:
        assert {"name", "input", "timeout"} <= set(test) and isinstance(test["input"], dict)
        assert 0 < test["timeout"] <= 900_000  # milliseconds
    config = TESTS["config"]
    assert config["gpuCount"] == 1 and config["gpuTypeId"]
    assert {entry["key"] for entry in config["env"]} <= set(ENV)
    assert set(config["allowedCudaVersions"]) <= set(HUB["config"]["allowedCudaVersions"])


def test_tests_json_requests_pass_through_the_handler_on_the_cpu(cache_dir, tmp_path):
    env: dict[str, Any] = {entry["key"]: entry["value"] for entry in TESTS["config"]["env"]}
    env["MODEL"] = "tiny"  # worker_env runs it on the CPU
    with serve_api(worker_env(cache_dir, tmp_path / "engines", **env), tmp_path / "api.log") as (url, _):
        for test in TESTS["tests"]:
            body = runsync(url, test["input"], timeout=test["timeout"] / 1000).json()
            assert body["status"] == "COMPLETED", (test["name"], str(body)[:500])
            output = body["output"]
            assert output["status"] == "success"
            assert len(output["output"]) == test["input"].get("num_images", 1)
            assert all(item["format"] == test["input"].get("output_format", "png") for item in output["output"])

"""Shared fixtures: one cache of built-in models per test session, and settings for them."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.settings import Settings


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built-in models are written here once per session, never into the user's cache."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def engine_dir(tmp_path: Path) -> Path:
    return tmp_path / "engines"


@pytest.fixture
def make_settings(cache_dir: Path, engine_dir: Path) -> Callable[..., Settings]:
    def make(**overrides: object) -> Settings:
        values: dict[str, object] = {"cache_dir": cache_dir, "engine_dir": engine_dir, "device": "cpu"}
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def subprocess_env(cache_dir: Path, engine_dir: Path) -> dict[str, str]:
    """Environment for running the project's commands as a user would, against the test caches."""
    env = dict(os.environ)
    env.update(CACHE_DIR=str(cache_dir), ENGINE_DIR=str(engine_dir), DEVICE="cpu", PYTHONUNBUFFERED="1")
    return env

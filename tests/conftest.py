"""Shared fixtures: one cache of built-in models per test session, and settings for them."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


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


def export_command(engine_dir: Path, cache_dir: Path, *extra: str) -> tuple[list[str], dict[str, str]]:
    """`python -m export` for the tiny model into a given store, as a user runs it."""
    env = dict(os.environ, ENGINE_DIR=str(engine_dir), CACHE_DIR=str(cache_dir), DEVICE="cpu", PYTHONUNBUFFERED="1")
    return [sys.executable, "-m", "export", "--model", "tiny", *extra], env


def run_export(engine_dir: Path, cache_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    command, env = export_command(engine_dir, cache_dir, *extra)
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """An engine store with every tiny component exported, shared read-only by the session."""
    engine_dir = tmp_path_factory.mktemp("exported")
    done = run_export(engine_dir, cache_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    return engine_dir

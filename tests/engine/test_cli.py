"""Configuration mistakes on the command line: one line that names the variable and the fix, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.parametrize(
    ("env", "code", "message"),
    [
        (
            {"MODEL": "/models/nope"},
            1,
            "error: MODEL=/models/nope: not a built-in model (tiny, tiny-sdxl, tiny-sd3, tiny-flux, "
            "tiny-flux-fill, tiny-flux-control, tiny-flux-kontext)",
        ),
        (
            {"BACKEND": "foo"},
            2,
            "error: BACKEND: Input should be 'auto', 'tensorrt', 'onnxruntime' or 'torch' (got 'foo')",
        ),
        (
            {"MODEL": "nobody/no-such-model", "HF_HUB_OFFLINE": "1"},
            1,
            "error: MODEL=nobody/no-such-model: not in the model cache",
        ),
    ],
)
def test_a_bad_setting_is_one_line_with_the_variable(subprocess_env, env, code, message):
    for command in (["-m", "engine", "--steps", "1"], ["-m", "export", "--components", "text_encoder"]):
        done = subprocess.run(
            [sys.executable, *command],
            cwd=ROOT,
            env={**subprocess_env, **env},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == code, done.stderr[-2000:]
        assert message in done.stderr, done.stderr[-2000:]
        assert "Traceback" not in done.stderr, done.stderr[-2000:]

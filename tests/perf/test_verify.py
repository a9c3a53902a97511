"""`python -m perf.verify` on the CPU, with onnxruntime as the candidate: its table passes for a right
backend and fails for a component that computes wrong or a LoRA that changes nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine.backends.onnxruntime import OnnxRuntimeRunner
from perf import verify
from tests.conftest import ROOT

STEPS = ["--backend", "onnxruntime", "--steps", "3", "--no-export"]


def table_rows(text: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split(" | ") for line in text.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [cell.strip() for cell in cells] for cells in rows[1:]}


def test_the_table_passes_for_onnxruntime_against_torch(exported, subprocess_env):
    env = dict(subprocess_env, ENGINE_DIR=str(exported), MODEL="tiny")
    done = subprocess.run(
        [sys.executable, "-m", "perf.verify", *STEPS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    rows = table_rows(done.stdout)
    assert set(rows) == {"text_encoder", "unet", "vae_decoder", "images (decoded)"}, done.stdout
    for component in ("text_encoder", "unet", "vae_decoder"):
        assert rows[component][1] == "onnxruntime" and rows[component][-1] == "ok", rows[component]
    for component in ("text_encoder", "unet"):  # the LoRA pair patches both
        assert "A again Δ0," in rows[component][5], rows[component]
    assert rows["images (decoded)"][-1] == "ok"
    assert "all checks passed" in done.stdout


@pytest.fixture
def in_process(exported, cache_dir, monkeypatch, tmp_path):
    """``verify.main`` in this process (so a test can break a backend), on the exported store."""
    monkeypatch.setenv("ENGINE_DIR", str(exported))
    monkeypatch.setenv("CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("DEVICE", "cpu")
    monkeypatch.setenv("MODEL", "tiny")
    monkeypatch.setenv("READY_FILE", str(tmp_path / "ready"))
    monkeypatch.setattr(verify, "configure_logging", lambda level: None)  # pytest keeps its log handlers


def test_a_component_past_its_bound_fails_the_table(in_process, monkeypatch, capsys):
    """The UNet on onnxruntime off by 0.01 (its bound at fp32 is about 1e-3): its row and the run fail."""
    run = OnnxRuntimeRunner.run

    def off(self, inputs):
        outputs = run(self, inputs)
        return {name: value + 0.01 for name, value in outputs.items()} if self.spec.name == "unet" else outputs

    monkeypatch.setattr(OnnxRuntimeRunner, "run", off)
    assert verify.main(STEPS) == 1
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert "max error 0.01 > " in rows["unet"][-1], out
    assert rows["text_encoder"][-1] == "ok" and rows["vae_decoder"][-1] == "ok", out
    assert "FAILED: unet" in out


def test_a_lora_that_changes_nothing_fails_the_refit_check(in_process, monkeypatch, capsys):
    """onnxruntime keeping its base weights whatever the LoRA set: A again equals A, but A equals the base
    and differs from torch's A, which the row must say."""
    monkeypatch.setattr(OnnxRuntimeRunner, "apply_patch", lambda self, patch: None)
    assert verify.main(STEPS) == 1
    rows = table_rows(capsys.readouterr().out)
    for component in ("text_encoder", "unet"):
        assert "LoRA A changed the outputs by 0," in rows[component][-1], rows[component]
        assert "LoRA A differs from torch's" in rows[component][-1], rows[component]
    assert rows["vae_decoder"][-1] == "ok"

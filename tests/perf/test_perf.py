"""`python -m perf` on the CPU: a table with the onnxruntime/torch ratio, JSON and a PNG chart."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from PIL import Image

from tests.conftest import ROOT


def test_perf_compares_backends_against_torch(exported, subprocess_env, tmp_path):
    env = dict(subprocess_env, ENGINE_DIR=str(exported))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "perf",
            "--model",
            "tiny",
            "--backends",
            "torch",
            "onnxruntime",
            "--steps",
            "4",
            "--warmup",
            "1",
            "--runs",
            "2",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| txt2img")]
    assert any("| onnxruntime |" in row and row.count("x |") >= 1 for row in rows), done.stdout
    assert any("| torch |" in row and "| 1.00x |" in row for row in rows), done.stdout
    few_step = [line for line in done.stdout.splitlines() if line.startswith("| few-step 64x64 4 steps, lcm |")]
    assert len(few_step) == 2, done.stdout  # torch and onnxruntime
    for row in few_step:  # the time outside the denoising loop, and its share of the request
        assert re.search(r"\| \d+\.\d \(\d+%\) \|", row), row
    [folder] = tmp_path.iterdir()
    results = json.loads((folder / "results.json").read_text())
    assert any(key.startswith("onnxruntime |") for key in results["speedup_vs_torch"])
    torch_result = next(r for r in results["results"] if r["backend"] == "torch")
    assert all(set(t["backends"].values()) == {"torch"} for t in torch_result["timings"])
    with Image.open(folder / "chart.png") as chart:
        assert chart.format == "PNG" and chart.width > 100


def test_perf_export_reports_time_and_peak_memory_per_stage(subprocess_env, tmp_path):
    command = [sys.executable, "-m", "perf.export", "--model", "tiny", "--precision", "fp16", "--out", str(tmp_path)]
    done = subprocess.run(
        [*command, "--components", "text_encoder", "unet"],
        cwd=ROOT,
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| unet | optimize |" in done.stdout and "| text_encoder | validate |" in done.stdout, done.stdout
    assert "x the largest" in done.stdout
    [folder] = tmp_path.iterdir()
    rows = json.loads((folder / "export.json").read_text())["components"]
    assert {row["component"] for row in rows} == {"text_encoder", "unet"}
    for row in rows:
        assert row["precision"] == "fp16"
        assert set(row["seconds"]) >= {"load", "reference", "export", "optimize", "validate"}
        assert all(peak > 0 for peak in row["peak_rss_mb"].values())


def test_perf_times_a_controlnet_scenario_against_diffusers_controlnet_pipeline(subprocess_env, cache_dir, tmp_path):
    from engine.models.builtin import builtin_model_folder
    from tests.test_controlnet import make_controlnet

    make_controlnet(builtin_model_folder("tiny", cache_dir), tmp_path / "controlnets" / "edges", seed=1)
    env = dict(subprocess_env, CONTROLNET_DIR=str(tmp_path / "controlnets"))
    command = [sys.executable, "-m", "perf", "--model", "tiny", "--controlnet", "edges", "--backends", "torch"]
    command += ["diffusers", "--steps", "2", "--warmup", "0", "--runs", "1", "--out", str(tmp_path / "out")]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if "+ controlnet edges" in line]
    assert any("| torch |" in row for row in rows) and any("| diffusers |" in row for row in rows), done.stdout
    [folder] = (tmp_path / "out").iterdir()
    results = json.loads((folder / "results.json").read_text())
    torch_result = next(r for r in results["results"] if r["backend"] == "torch")
    [timing] = [t for t in torch_result["timings"] if t["scenario"].endswith("+ controlnet edges")]
    assert timing["backends"]["controlnet.edges"] == "torch"

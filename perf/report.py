"""Results as JSON, a Markdown table with speedups against torch, and a PNG chart."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from perf.bench import BackendResult, Timing

BASELINE = "torch"


def speedups(results: list[BackendResult]) -> dict[tuple[str, str], float]:
    """backend, scenario -> torch's p50 over this backend's p50 (above 1 is faster)."""
    baseline = {t.scenario: t.end_to_end_ms["p50"] for r in results if r.backend == BASELINE for t in r.timings}
    return {
        (t.backend, t.scenario): round(baseline[t.scenario] / t.end_to_end_ms["p50"], 2)
        for r in results
        for t in r.timings
        if t.scenario in baseline and t.end_to_end_ms["p50"] > 0
    }


def outside_denoiser(timing: Timing) -> str:
    """The request's time outside the denoising loop (text encoders, VAE, pre- and postprocessing, the
    worker's own work), p50 minus the loop's p50, with its share of the request."""
    total, denoise = timing.end_to_end_ms["p50"], timing.stages_ms.get("denoise", {}).get("p50")
    if denoise is None or total <= 0:
        return ""
    outside = max(total - denoise, 0.0)
    return f"{outside:.1f} ({outside / total:.0%})"


def markdown(results: list[BackendResult], header: str) -> str:
    ratio = speedups(results)
    lines = [
        header,
        "",
        "| scenario | backend | p50 ms | p95 ms | UNet step p50 ms | VAE decode p50 ms | outside the denoiser p50 ms "
        "| vs torch | note |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    timings = sorted((t for r in results for t in r.timings), key=lambda t: (t.scenario, t.backend != BASELINE))
    for t in timings:
        step = t.stages_ms.get("unet_step", {}).get("p50", "")
        decode = t.stages_ms.get("vae_decode", {}).get("p50", "")
        speedup = ratio.get((t.backend, t.scenario))
        lines.append(
            f"| {t.scenario} | {t.backend} | {t.end_to_end_ms['p50']} | {t.end_to_end_ms['p95']} | {step} | "
            f"{decode} | {outside_denoiser(t)} | {f'{speedup:.2f}x' if speedup else ''} | {t.note} |"
        )
    for r in results:
        if r.skipped:
            lines.append(f"\n{r.backend} skipped: {r.skipped}")
    return "\n".join(lines) + "\n"


def chart(results: list[BackendResult], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = sorted({t.scenario for r in results for t in r.timings})
    backends = [r.backend for r in results if r.timings]
    width = 0.8 / max(len(backends), 1)
    figure, axes = plt.subplots(figsize=(max(6, 2.5 * len(scenarios)), 4.5))
    for index, backend in enumerate(backends):
        by_scenario = {t.scenario: t.end_to_end_ms["p50"] for r in results if r.backend == backend for t in r.timings}
        positions = [s + index * width for s in range(len(scenarios))]
        axes.bar(positions, [by_scenario.get(s, 0) for s in scenarios], width, label=backend)
    axes.set_xticks([s + width * (len(backends) - 1) / 2 for s in range(len(scenarios))], scenarios)
    axes.set_ylabel("end-to-end p50 (ms)")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write(results: list[BackendResult], folder: Path, context: dict) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    title = f"{context['model']} on {context['device']} ({context['precision']})"
    paths = {"json": folder / "results.json", "markdown": folder / "results.md", "chart": folder / "chart.png"}
    payload = {
        "context": context,
        "results": [asdict(r) for r in results],
        "speedup_vs_torch": {f"{b} | {s}": v for (b, s), v in speedups(results).items()},
    }
    paths["json"].write_text(json.dumps(payload, indent=2))
    paths["markdown"].write_text(markdown(results, f"## {title}"))
    chart(results, paths["chart"], title)
    return paths

"""`python -m perf.ip_adapter`: one table row per backend, from requests that really ran the IP denoiser."""

from __future__ import annotations

import pytest

from perf import ip_adapter


def test_perf_times_an_adapter_against_the_plain_unet(cache_dir, engine_dir, monkeypatch, capsys):
    for name, value in {"CACHE_DIR": cache_dir, "ENGINE_DIR": engine_dir, "DEVICE": "cpu"}.items():
        monkeypatch.setenv(name, str(value))
    assert ip_adapter.main(["--model", "tiny", "--backends", "torch", "--steps", "2", "--runs", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    [row] = [line for line in lines if line.startswith("| torch |")]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    first_use, switch, plain_step, ip_step = (float(cell.split(" / ")[0]) for cell in cells[1:5])
    assert first_use > 0 and switch > 0, "the switch between two adapters patches the IP denoiser"
    assert plain_step > 0 and ip_step > 0
    assert "unet_ip=torch" in cells[5] and "ip_projection.models--plain-" in cells[5]


@pytest.mark.parametrize("argv", [["--adapters", "a"], ["--backends", "nope"]])
def test_perf_refuses_bad_arguments(argv):
    with pytest.raises(SystemExit):
        ip_adapter.parse_args(argv)

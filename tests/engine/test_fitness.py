"""Start-up: fitness checks that fail with a useful message, and a worker that cannot start."""

from __future__ import annotations

import pytest

from engine.common.metrics import ColdStart
from engine.serving import fitness
from engine.serving.startup import Startup, start
from tests.conftest import use_settings_env


def test_every_check_passes_on_a_healthy_cpu_worker(make_settings):
    settings = make_settings()
    for check in fitness.CHECKS:
        check(settings)


@pytest.mark.parametrize(
    ("overrides", "check", "message"),
    [
        ({"device": "cuda:99"}, fitness.gpu_visible, r"no CUDA GPU is visible|only \d+ GPU\(s\) are visible"),
        ({"model": "/nonexistent/model"}, fitness.model_complete, "not a built-in model"),
        ({"min_free_disk_gb": 1e9}, fitness.enough_disk_and_memory, "MIN_FREE_DISK_GB"),
        ({"min_free_memory_gb": 1e9}, fitness.enough_disk_and_memory, "MIN_FREE_MEMORY_GB"),
    ],
)
def test_each_check_names_what_is_wrong(make_settings, overrides, check, message):
    with pytest.raises(Exception, match=message):
        check(make_settings(**overrides))


def test_an_incomplete_model_folder_fails(make_settings, tmp_path, cache_dir):
    import shutil

    from engine.models.model import load_model

    folder = tmp_path / "model"
    shutil.copytree(load_model("tiny", cache_dir).folder, folder)
    for weights in (folder / "unet").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(Exception, match="unet/ weights"):
        fitness.model_complete(make_settings(model=str(folder)))


def test_an_engine_dir_that_is_a_file_fails(make_settings, tmp_path):
    path = tmp_path / "engines"
    path.write_text("")
    with pytest.raises(RuntimeError, match="is not a folder"):
        fitness.engine_store_readable(make_settings(engine_dir=path))


def test_a_worker_that_cannot_start_reports_why_and_fails_its_fitness(monkeypatch, make_settings):
    settings = make_settings(model="/nonexistent/model")
    use_settings_env(monkeypatch, settings)
    startup = start(ColdStart())
    assert startup.worker is None and "not a built-in" in startup.error
    checks = {check.__name__: check for check in startup.fitness_checks()}
    assert list(checks)[-1] == "worker_started"
    with pytest.raises(RuntimeError, match="the worker failed to start"):
        checks["worker_started"]()
    with pytest.raises(Exception, match="not a built-in"):
        checks["model_complete"]()
    assert not settings.ready_file.exists()


def test_an_unexpected_start_up_failure_keeps_its_text_in_the_log(monkeypatch, make_settings, capsys):
    import engine.serving.startup

    def broken(*args, **kwargs):
        raise RuntimeError("cannot read /srv/private/weights")

    use_settings_env(monkeypatch, make_settings())
    monkeypatch.setattr(engine.serving.startup, "Worker", broken)
    startup = start(ColdStart())
    assert startup.error == "RuntimeError (the worker's log has the details)"
    assert "cannot read /srv/private/weights" in capsys.readouterr().err, "the log (JSON on stderr) has it"


def test_invalid_configuration_is_reported_not_raised(monkeypatch):
    monkeypatch.setenv("MAX_STEPS", "many")
    startup = start(ColdStart())
    assert startup.settings is None and "MAX_STEPS" in startup.error.upper()
    assert [check.__name__ for check in startup.fitness_checks()] == ["engines_load", "worker_started"]


def test_a_started_worker_writes_its_ready_file_and_warms_up(monkeypatch, make_settings):
    settings = make_settings(warmup=True)
    use_settings_env(monkeypatch, settings)
    cold_start = ColdStart()
    startup: Startup = start(cold_start)
    assert startup.error is None
    assert settings.ready_file.read_text().strip().isdigit()
    assert "warmup" in cold_start.phases_ms
    response = startup.worker.handle({"id": "1", "input": {"prompt": "a fox", "num_inference_steps": 2}})
    assert response["metrics"]["cold_start"] is True, "the warm-up does not use up the cold-start report"

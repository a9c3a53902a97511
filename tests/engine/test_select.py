"""Runner chains at run time: a failing runner hands its call on, keeps failing and is taken out,
runners are chosen on the shapes a call really has, and TORCH_FALLBACK decides what is left.

The real worker runs on the exported tiny models; the failing runner is a stand-in, since
onnxruntime and TensorRT do not fail on demand.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from engine.backends.base import Runner
from engine.backends.chain import FAILURES_BEFORE_REMOVAL
from engine.backends.onnxruntime import OnnxRuntimeRunner
from engine.backends.torch import LazyTorchRunner
from engine.serving.worker import Worker
from engine.spec import Shape
from tests.export.test_export import REQUEST, images_of


class FailingRunner(Runner):
    """Stands in for an engine that breaks at run time."""

    backend = "tensorrt"

    def __init__(self, wrapped: Runner, error: Exception):
        super().__init__(wrapped.spec, wrapped.precision, wrapped.device)
        self.error = error
        self.calls = 0

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.calls += 1
        raise self.error


class RowLimitedRunner(Runner):
    """Stands in for an engine built for at most ``max_rows`` rows; records the rows it was given."""

    backend = "tensorrt"

    def __init__(self, wrapped: Runner, max_rows: int):
        super().__init__(wrapped.spec, wrapped.precision, wrapped.device)
        self.wrapped = wrapped
        self.max_rows = max_rows
        self.rows: list[int] = []

    def unsupported_reason(self, shapes: Mapping[str, Shape]) -> str | None:
        rows = shapes["input_ids"][0]
        return None if rows <= self.max_rows else f"{rows} rows, the engine takes {self.max_rows}"

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.rows.append(inputs["input_ids"].shape[0])
        return self.wrapped.run(inputs)


def test_a_runner_that_fails_mid_request_hands_the_call_to_the_next_one(exported, make_settings):
    worker = Worker(make_settings(backend="onnxruntime", engine_dir=exported))
    expected = worker.handle({"id": "before", "input": REQUEST})
    chain = worker.chains["unet"]
    failing = FailingRunner(chain.runners[0], RuntimeError("enqueue failed"))
    chain.runners.insert(0, failing)

    response = worker.handle({"id": "during", "input": REQUEST})
    assert response["status"] == "success", response
    assert response["metrics"]["backends"]["unet"] == "onnxruntime"
    assert "tensorrt: failed while running (the worker logged why)" in response["metrics"]["fallbacks"]["unet"]
    assert "enqueue failed" not in str(response), "the error's own text stays in the log"
    for mine, reference in zip(images_of(response), images_of(expected), strict=True):
        assert np.array_equal(mine, reference)


def test_a_runner_that_keeps_failing_is_taken_out_of_its_chain(exported, make_settings, caplog):
    worker = Worker(make_settings(backend="onnxruntime", engine_dir=exported))
    chain = worker.chains["unet"]
    failing = FailingRunner(chain.runners[0], RuntimeError("enqueue failed"))
    chain.runners.insert(0, failing)

    response = worker.handle({"id": "a", "input": REQUEST})
    assert response["status"] == "success"
    assert failing.calls == FAILURES_BEFORE_REMOVAL, "taken out after that many failures in a row, mid-request"
    assert failing not in chain.runners
    assert "taken out of service" in caplog.text

    later = worker.handle({"id": "b", "input": REQUEST})
    assert failing.calls == FAILURES_BEFORE_REMOVAL
    assert "tensorrt: taken out after 3 failures in a row" in later["metrics"]["fallbacks"]["unet"]
    assert later["metrics"]["backends"]["unet"] == "onnxruntime"


def test_out_of_memory_is_not_retried_on_the_next_runner(exported, make_settings):
    worker = Worker(make_settings(backend="onnxruntime", engine_dir=exported))
    chain = worker.chains["unet"]
    failing = FailingRunner(chain.runners[0], torch.cuda.OutOfMemoryError("CUDA out of memory"))
    chain.runners.insert(0, failing)
    response = worker.handle({"id": "a", "input": REQUEST})
    assert response["status"] == "error"
    assert response["error"].startswith("out of GPU memory")
    assert failing.calls == 1 and failing in chain.runners
    assert worker.handle({"id": "b", "input": {**REQUEST, "num_inference_steps": 1}})["status"] == "error"


def test_runners_are_chosen_on_the_rows_each_text_encoder_really_gets(exported_sdxl, make_settings):
    """SDXL zeroes the negative embeddings when no negative prompt is given: its encoders see N rows, not 2N."""
    worker = Worker(make_settings(model="tiny-sdxl", backend="onnxruntime", engine_dir=exported_sdxl))
    limited = {}
    for encoder in ("text_encoder", "text_encoder_2"):
        chain = worker.chains[encoder]
        limited[encoder] = RowLimitedRunner(chain.runners[0], max_rows=1)
        chain.runners.insert(0, limited[encoder])

    zeroed = worker.handle({"id": "a", "input": {"prompt": "a fox", "num_inference_steps": 2, "seed": 1}})
    assert zeroed["metrics"]["backends"]["text_encoder"] == "tensorrt"
    assert zeroed["metrics"]["backends"]["text_encoder_2"] == "tensorrt"
    assert limited["text_encoder"].rows == [1]

    negative = {"prompt": "a fox", "negative_prompt": "fog", "num_inference_steps": 2, "seed": 1}
    encoded = worker.handle({"id": "b", "input": negative})
    assert encoded["metrics"]["backends"]["text_encoder"] == "onnxruntime"
    assert "tensorrt: 2 rows, the engine takes 1" in encoded["metrics"]["fallbacks"]["text_encoder"]


def test_without_the_torch_fallback_an_uncovered_request_is_refused_clearly(exported, make_settings, tmp_path):
    import shutil

    from engine.store.store import Store

    partial = tmp_path / "engines"
    shutil.copytree(exported, partial)
    for artifact in Store(partial).find(component="unet"):
        shutil.rmtree(artifact.path)
    worker = Worker(make_settings(backend="onnxruntime", engine_dir=partial, torch_fallback="off"))
    assert not any(isinstance(r, LazyTorchRunner) for chain in worker.chains.values() for r in chain.runners)
    response = worker.handle({"id": "a", "input": REQUEST})
    assert response["status"] == "error"
    assert response["error"].startswith("unet: no backend takes shapes")
    assert "no fp32 ONNX export" in response["error"] and "torch: TORCH_FALLBACK=off" in response["error"]
    assert worker.handle({"id": "b", "input": REQUEST})["status"] == "error", "still serving, still refusing"


def test_eager_torch_fallback_loads_every_fallback_at_start_up(exported, make_settings):
    worker = Worker(make_settings(backend="onnxruntime", engine_dir=exported, torch_fallback="eager"))
    fallbacks = [chain.runners[-1] for chain in worker.chains.values()]
    assert all(isinstance(r, LazyTorchRunner) and r._runner is not None for r in fallbacks)
    assert all(isinstance(chain.runners[0], OnnxRuntimeRunner) for chain in worker.chains.values())


def test_nothing_exported_yet_is_one_info_line_with_the_command_for_this_model(make_settings, caplog, tmp_path):
    import logging

    caplog.set_level(logging.INFO)
    worker = Worker(make_settings(model="tiny-sdxl", backend="onnxruntime", engine_dir=tmp_path / "empty"))
    hint = "run `python -m export --model tiny-sdxl`"
    records = [r for r in caplog.records if r.name == "engine.backends.assemble"]
    assert not [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    [line] = [r.getMessage() for r in records if "nothing built" in r.getMessage()]
    assert "nothing built for onnxruntime yet (text_encoder, text_encoder_2, unet, vae_decoder, vae_encoder)" in line
    assert hint in line
    assert str(tmp_path / "empty") in line, "the log names the engine store"
    response = worker.handle({"id": "a", "input": {**REQUEST, "negative_prompt": None}})
    assert hint in response["metrics"]["fallbacks"]["unet"]
    assert "no fp32 ONNX export in the engine store" in response["metrics"]["fallbacks"]["unet"]
    assert str(tmp_path) not in str(response), "no server path reaches the caller"


def test_a_local_model_folder_is_named_by_its_setting_in_replies(make_settings, tmp_path, cache_dir):
    import shutil

    from engine.models.model import load_model

    folder = tmp_path / "models" / "private-name"
    shutil.copytree(load_model("tiny", cache_dir).folder, folder)
    worker = Worker(make_settings(model=str(folder), backend="onnxruntime", engine_dir=tmp_path / "empty"))
    response = worker.handle({"id": "a", "input": REQUEST})
    assert 'run `python -m export --model "$MODEL"`' in response["metrics"]["fallbacks"]["unet"]
    assert "private-name" not in str(response) and str(tmp_path) not in str(response)

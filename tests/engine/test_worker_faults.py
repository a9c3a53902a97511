"""What a job can do to the worker: run out of time, of GPU memory, or break the GPU; and what it reports.

GPU faults cannot happen on this CPU machine, so a UNet runner that raises torch's own
exception types stands in for the GPU that would raise them, and the worker's fault judge is
told it runs on CUDA with a device check that fails or not.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest
import torch
from runpod.serverless.modules.rp_job import run_job

from engine.backends.base import Runner
from engine.common.faults import DeviceFaults
from engine.common.logs import JsonFormatter
from engine.serving.worker import Worker

REQUEST = {"prompt": "a fox", "num_inference_steps": 3, "seed": 1}


class FailingRunner(Runner):
    backend = "torch"

    def __init__(self, runner: Runner, error: Exception):
        super().__init__(runner.spec, runner.precision, runner.device)
        self.error = error

    def run(self, inputs):
        raise self.error


@pytest.fixture
def worker(make_settings) -> Worker:
    return Worker(make_settings(backend="torch", progress_every=5))


def break_unet(worker: Worker, error: Exception) -> Runner:
    chain = worker.chains["unet"]
    original = chain.runners[-1]
    chain.runners[-1] = FailingRunner(original, error)
    return original


def test_out_of_memory_is_a_clear_error_and_the_next_job_runs(worker):
    original = break_unet(worker, torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    response = worker.handle({"id": "oom", "input": REQUEST})
    assert response == {
        "status": "error",
        "error": "out of GPU memory: try fewer images, a smaller size, or a larger GPU",
        "request_id": "oom",
    }
    worker.chains["unet"].runners[-1] = original
    assert worker.handle({"id": "next", "input": REQUEST})["status"] == "success"


def on_a_gpu(worker: Worker, still_fails: bool) -> None:
    """The worker judges faults as on a CUDA device whose confirming check (a synchronize) says ``still_fails``."""
    worker.faults = DeviceFaults(torch.device("cuda"), still_fails=lambda device: still_fails)


def test_a_cuda_error_the_device_still_fails_after_asks_runpod_for_a_new_worker(worker, caplog):
    on_a_gpu(worker, still_fails=True)
    break_unet(worker, torch.AcceleratorError("CUDA error: an illegal memory access was encountered"))
    response = worker.handle({"id": "xid", "input": REQUEST})
    assert response == {
        "status": "error",
        "error": "the GPU failed; this worker will be replaced (request xid)",
        "request_id": "xid",
        "refresh_worker": True,
    }
    assert "illegal memory access" in caplog.text, "the log has the error itself"

    result = asyncio.run(run_job(lambda job: worker.handle(job), {"id": "xid-2", "input": REQUEST}))
    assert result["stopPod"] is True


def test_a_cuda_error_after_which_the_device_works_keeps_the_worker(worker):
    on_a_gpu(worker, still_fails=False)
    original = break_unet(worker, torch.AcceleratorError("CUDA error: an illegal memory access was encountered"))
    response = worker.handle({"id": "passing", "input": REQUEST})
    assert response["error"] == "internal error: the worker logged the details (request passing)"
    assert "refresh_worker" not in response
    worker.chains["unet"].runners[-1] = original
    assert worker.handle({"id": "after", "input": REQUEST})["status"] == "success"


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("CUDA error: an illegal memory access was encountered"),
        ValueError("Port could not be cast to integer value as 'CUDA driver'"),
        torch.AcceleratorError("CUDA error: unspecified launch failure"),
    ],
    ids=["message-only", "request-text", "cuda-type-on-cpu"],
)
def test_no_error_replaces_a_cpu_worker_whatever_it_says(worker, error):
    original = break_unet(worker, error)
    response = worker.handle({"id": "cpu", "input": REQUEST})
    assert response == {
        "status": "error",
        "error": "internal error: the worker logged the details (request cpu)",
        "request_id": "cpu",
    }
    worker.chains["unet"].runners[-1] = original
    assert worker.handle({"id": "after", "input": REQUEST})["status"] == "success"


def test_a_message_never_makes_an_error_fatal_even_on_a_failing_gpu(worker):
    on_a_gpu(worker, still_fails=True)
    break_unet(worker, RuntimeError("CUDA error: an illegal memory access was encountered"))
    response = worker.handle({"id": "words", "input": REQUEST})
    assert "refresh_worker" not in response and response["error"].startswith("internal error:")


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"image": "http://a:CUDA driver/x.png"}, "image: not a valid URL"),
        ({"loras": [{"url": "https://a:illegal memory access/x.safetensors"}]}, "loras[0].url: not a valid URL"),
    ],
)
def test_urls_crafted_to_look_like_gpu_faults_are_request_errors(worker, payload, message):
    on_a_gpu(worker, still_fails=True)  # were it judged a fault, even a GPU that fails would not make it fatal
    response = worker.handle({"id": "url", "input": {**REQUEST, **payload}})
    assert response == {"status": "error", "error": message, "request_id": "url"}


def test_any_other_exception_is_a_fixed_error_with_the_request_id(worker, caplog):
    original = break_unet(worker, ValueError("shapes do not broadcast at /srv/secret/path"))
    response = worker.handle({"id": "bug", "input": REQUEST})
    assert response == {
        "status": "error",
        "error": "internal error: the worker logged the details (request bug)",
        "request_id": "bug",
    }
    assert "shapes do not broadcast at /srv/secret/path" in caplog.text
    worker.chains["unet"].runners[-1] = original
    assert worker.handle({"id": "after", "input": REQUEST})["status"] == "success"


def test_a_request_past_its_deadline_stops_between_steps(worker):
    response = worker.handle({"id": "slow", "input": {**REQUEST, "num_inference_steps": 50, "timeout_s": 0.001}})
    assert response["status"] == "error"
    assert response["error"].startswith("timeout_s: the request passed its 0.001 s deadline after step 1 of")
    assert worker.handle({"id": "fast", "input": REQUEST})["status"] == "success"


def test_progress_is_reported_every_few_steps_and_at_the_end(worker):
    updates: list[dict] = []
    response = worker.handle(
        {"id": "p", "input": {**REQUEST, "num_inference_steps": 12, "scheduler": "euler"}}, updates.append
    )
    assert response["status"] == "success"
    assert updates == [{"step": 5, "total_steps": 12}, {"step": 10, "total_steps": 12}, {"step": 12, "total_steps": 12}]


def test_every_log_line_of_a_job_carries_its_request_id(worker):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("engine")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        worker.handle({"id": "req-42", "input": REQUEST})
        worker.handle({"id": "req-43", "input": {"prompt": 5}})
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert {line["request_id"] for line in lines} == {"req-42", "req-43"}
    assert any(line["message"] == "job done" and line["request_id"] == "req-42" for line in lines)

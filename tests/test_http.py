"""HTTP mode's routes through Starlette's TestClient: /ping's states, the queue's job route, OpenAI's images
API, and hostile requests, against the tiny model on the CPU."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import threading
import time
from collections.abc import Callable

import pytest
from PIL import Image
from starlette.testclient import TestClient

from engine.http.app import create_app, health_app
from engine.http.service import Busy, Gate, Service
from engine.serving.startup import Startup
from engine.serving.worker import Answer, Worker
from engine.settings import Settings
from tests.engine.test_delivery import KEYS

SMALL = {"num_inference_steps": 2, "seed": 7}


@pytest.fixture(scope="module")
def settings(cache_dir, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    engines = tmp_path_factory.mktemp("http-engines")
    return Settings(
        cache_dir=cache_dir,
        engine_dir=engines,
        device="cpu",
        backend="torch",
        ready_file=engines / "ready",
    )


@pytest.fixture(scope="module")
def worker(settings: Settings) -> Worker:
    return Worker(settings)


def serving(settings: Settings, worker: Worker | None, error: str | None = None, **overrides: object) -> Service:
    service = Service(settings.model_copy(update=overrides))
    service.startup = Startup(settings, worker, error)
    return service


@pytest.fixture(scope="module")
def client(settings: Settings, worker: Worker) -> TestClient:
    return TestClient(create_app(serving(settings, worker)))


def png(size: tuple[int, int] = (64, 64), mode: str = "RGB", color: object = (200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, color).save(out, format="PNG")
    return out.getvalue()


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def openai_error(response, status: int, param: str | None) -> str:
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    assert error["type"] == ("invalid_request_error" if status < 500 and status != 429 else error["type"])
    return error["message"]


def test_ping_says_starting_ready_or_failed_as_runpod_reads_it(settings, worker):
    starting = Service(settings)
    assert TestClient(create_app(starting)).get("/ping").status_code == 204
    assert TestClient(health_app(starting)).get("/ping").status_code == 204
    assert TestClient(create_app(serving(settings, worker))).get("/ping").status_code == 200
    failed = TestClient(create_app(serving(settings, None, "MODEL=x: not a built-in model")))
    response = failed.get("/ping")
    assert response.status_code == 503 and "not a built-in model" in response.json()["error"]
    assert failed.post("/generate", json={"input": {"prompt": "a fox"}}).status_code == 503
    health = TestClient(health_app(serving(settings, worker)))
    assert health.get("/ping").status_code == 200
    assert health.post("/generate", json={"input": {"prompt": "a fox"}}).status_code == 404


def test_a_gpu_fault_that_asks_for_a_new_worker_turns_ping_unhealthy(settings):
    class FaultyWorker:
        def answer(self, job: dict, progress: object = None, upload: bool = False) -> Answer:
            message = "the GPU failed; this worker will be replaced (request x)"
            return Answer({"status": "error", "error": message, "refresh_worker": True}, RuntimeError("CUDA"))

    client = TestClient(create_app(serving(settings, FaultyWorker())))
    assert client.get("/ping").status_code == 200
    response = client.post("/generate", json={"input": {"prompt": "a fox"}})
    assert response.status_code == 500 and response.json()["refresh_worker"] is True
    ping = client.get("/ping")
    assert ping.status_code == 503 and "the GPU failed" in ping.json()["error"]
    assert "the GPU failed" in openai_error(client.post("/v1/images/generations", json={"prompt": "a"}), 503, None)


def test_a_request_while_the_worker_starts_is_told_to_retry(settings):
    client = TestClient(create_app(Service(settings)))
    response = client.post("/v1/images/generations", json={"prompt": "a fox"})
    assert openai_error(response, 503, None).startswith("the worker is starting")
    assert response.headers["retry-after"] == "10"


def test_generate_answers_as_the_queue_does(client, worker):
    job = {"prompt": "a red fox", **SMALL}
    response = client.post("/generate", json={"input": job})
    assert response.status_code == 200
    body = response.json()
    queued = worker.handle({"id": "q", "input": job})
    assert set(body) == set(queued) == {"status", "output", "metrics"}
    assert body["output"][0]["image"] == queued["output"][0]["image"]
    assert {k: v for k, v in body["output"][0].items() if k != "image"} == {
        "seed": 7,
        "width": 64,
        "height": 64,
        "format": "png",
    }


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"input": {"prompt": "a fox", "num_inference_steps": 0}}, "num_inference_steps: must be 1 to"),
        ({"input": "a fox"}, "input"),
        ({"prompt": "a fox"}, "input: required"),
        ([1, 2], "body: must be a JSON object"),
    ],
)
def test_generate_refuses_a_bad_job_with_400_in_the_queue_shape(client, body, message):
    response = client.post("/generate", json=body)
    assert response.status_code == 400
    assert response.json()["status"] == "error" and message in response.json()["error"]


def test_generate_refuses_a_body_that_is_not_json(client):
    response = client.post("/generate", content=b"{not json")
    assert response.status_code == 400 and response.json() == {"status": "error", "error": "body: not valid JSON"}


def test_openai_generations_return_b64_images_with_their_seeds(client):
    response = client.post(
        "/v1/images/generations",
        json={
            "prompt": "a red fox",
            "n": 2,
            "size": "64x80",
            "model": "tiny",
            "quality": "hd",
            "style": "vivid",
            **SMALL,
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert [item["seed"] for item in body["data"]] == [7, 8]
    assert [decoded(item["b64_json"]).size for item in body["data"]] == [(64, 80), (64, 80)]
    assert body["size"] == "64x80" and body["output_format"] == "png" and isinstance(body["created"], int)
    assert body["metrics"]["num_samples"] == 2


def test_openai_output_format_and_compression_map_to_the_worker(client):
    body = {"prompt": "a fox", "output_format": "jpeg", "output_compression": 0, **SMALL}
    response = client.post("/v1/images/generations", json=body)
    assert response.status_code == 200, response.text
    assert decoded(response.json()["data"][0]["b64_json"]).format == "JPEG"


@pytest.mark.parametrize(
    ("body", "status", "param", "message"),
    [
        ({"n": 10**9}, 400, "n", "n: num_images: must be 1 to 4, got 1000000000"),
        ({"n": 10**400}, 400, "n", "n:"),
        ({"n": "many"}, 400, "n", "n:"),
        ({"n": 0}, 400, "n", "n:"),
        ({"size": "64x"}, 400, "size", "size: must be 'auto' or WIDTHxHEIGHT"),
        ({"size": "0x64"}, 400, "size", "size: must be"),
        ({"size": "64X64"}, 400, "size", "size: must be"),
        ({"size": "99999999x1"}, 400, "size", "size: must be"),
        ({"size": 64}, 400, "size", "size:"),
        ({"size": "65x64"}, 400, "size", "size: width: must be a multiple of 8"),
        ({"size": "4096x4096"}, 400, "size", "size: width: must be 64 to 2048"),
        ({"prompt": None}, 400, "prompt", "prompt:"),
        ({"prompt": "x" * 10_001}, 400, "prompt", "prompt: each must be at most"),
        ({"num_images": 2}, 400, "num_images", "num_images: unknown field"),
        ({"wat": 1}, 400, "wat", "wat: unknown field"),
        ({"w\x00" * 10**5: 1}, 400, "'" + "w\\x00" * 20 + "'... (200000 characters)", "characters): unknown field"),
        ({"seed": -1}, 400, "seed", "seed:"),
        ({"model": "dall-e-3"}, 404, "model", "this endpoint serves 'tiny', not 'dall-e-3'"),
        ({"response_format": "url"}, 400, "response_format", "url needs a bucket"),
        ({"response_format": "gif"}, 400, "response_format", "response_format:"),
        ({"stream": True}, 400, "stream", "streaming is not supported"),
        ({"output_compression": 101}, 400, "output_compression", "output_compression:"),
    ],
)
def test_openai_generations_refuse_hostile_fields_by_name(client, body, status, param, message):
    response = client.post("/v1/images/generations", json={"prompt": "a fox", **SMALL, **body})
    assert message in openai_error(response, status, param)


def test_openai_errors_for_bodies_that_are_not_a_request(client):
    assert "not valid JSON" in openai_error(client.post("/v1/images/generations", content=b"\xff"), 400, None)
    assert "JSON object" in openai_error(client.post("/v1/images/generations", json="a fox"), 400, None)
    assert openai_error(client.get("/v1/images/generations"), 405, None)
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"


def test_openai_edits_run_image_to_image_and_inpaint_with_openais_mask(client):
    files = {"image": ("photo.png", png(), "image/png")}
    fields = {"prompt": "a blue fox", "size": "64x64", "strength": "0.5", **{k: str(v) for k, v in SMALL.items()}}
    response = client.post("/v1/images/edits", files=files, data=fields)
    assert response.status_code == 200, response.text
    assert response.json()["metrics"]["mode"] == "img2img"
    assert decoded(response.json()["data"][0]["b64_json"]).size == (64, 64)

    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 32, 64))  # OpenAI: the transparent left half is edited
    out = io.BytesIO()
    mask.save(out, format="PNG")
    files["mask"] = ("mask.png", out.getvalue(), "image/png")
    fields.pop("strength")
    response = client.post("/v1/images/edits", files=files, data=fields)
    assert response.status_code == 200, response.text
    assert response.json()["metrics"]["mode"] == "inpaint"


def test_openais_mask_becomes_the_workers_white_repaints_mask():
    from engine.http.openai import repaint_mask

    mask = Image.new("RGBA", (16, 8), (255, 255, 255, 255))
    mask.paste((10, 20, 30, 0), (0, 0, 4, 8))
    out = io.BytesIO()
    mask.save(out, format="PNG")
    converted = decoded(repaint_mask(out.getvalue(), Settings(device="cpu")))
    assert converted.mode == "L"
    assert converted.getpixel((0, 0)) == 255 and converted.getpixel((3, 7)) == 255
    assert converted.getpixel((4, 0)) == 0 and converted.getpixel((15, 7)) == 0


@pytest.mark.parametrize(
    ("files", "param", "message"),
    [
        ({"image": ("x.png", b"not an image at all", "image/png")}, "image", "image: not a PNG, JPEG or WebP image"),
        ({}, "image", "image: one image file is required"),
        ({"mask": ("m.png", png(), "image/png")}, "image", "image: one image file"),
        (
            {"image": ("x.png", png(), "image/png"), "mask": ("m.png", png(), "image/png")},
            "mask",
            "mask: needs an alpha channel",
        ),
        (
            {"image": ("x.png", png(), "image/png"), "mask": ("m.png", b"GIF89a junk", "image/png")},
            "mask",
            "mask: not a PNG or WebP image",
        ),
        (
            {"image": ("x.png", png(), "image/png"), "mask": ("m.png", png((4096, 8), "RGBA"), "image/png")},
            "mask",
            "mask: sides must be at most 2048",
        ),
    ],
)
def test_openai_edits_refuse_bad_uploads_by_name(client, files, param, message):
    response = client.post("/v1/images/edits", files=files or {"x": ("x", b"", "text/plain")}, data={"prompt": "a"})
    assert message in openai_error(response, 400, param)


def test_openai_edits_need_multipart(client):
    response = client.post("/v1/images/edits", json={"prompt": "a fox", "image": "aGVsbG8="})
    assert "multipart/form-data" in openai_error(response, 400, None)


def test_a_body_over_the_limit_is_refused_before_it_is_read(settings, worker):
    client = TestClient(create_app(serving(settings, worker, http_max_body_bytes=1000)))
    big = {"prompt": "x" * 2000}
    assert "HTTP_MAX_BODY_BYTES" in openai_error(client.post("/v1/images/generations", json=big), 413, None)
    response = client.post("/generate", json={"input": big})
    assert response.status_code == 413 and response.json()["status"] == "error"

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(10):
            yield b" " * 500

    assert openai_error(client.post("/v1/images/generations", content=chunks()), 413, None)
    files = {"image": ("x.png", os.urandom(2000), "image/png")}
    assert openai_error(client.post("/v1/images/edits", files=files, data={"prompt": "a"}), 413, None)


def run(coroutine_function: Callable) -> object:
    return asyncio.run(coroutine_function())


def test_the_gate_runs_one_job_at_a_time_and_refuses_past_its_bound():
    running, most = [0], [0]
    release = threading.Event()

    def job(name: str, wait: bool = False) -> Callable[[], str]:
        def work() -> str:
            running[0] += 1
            most[0] = max(most[0], running[0])
            if wait:
                release.wait(10)
            time.sleep(0.01)
            running[0] -= 1
            return name

        return work

    async def scenario() -> list[str]:
        gate = Gate(max_waiting=1)
        first = asyncio.create_task(gate.run(job("first", wait=True)))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(gate.run(job("second")))
        await asyncio.sleep(0.05)
        with pytest.raises(Busy) as busy:
            await gate.run(job("third"))
        assert busy.value.retry_after >= 1
        release.set()
        done = [await first, await second]
        done.append(await gate.run(job("fourth")))  # free again once the line is gone
        return done

    assert run(scenario) == ["first", "second", "fourth"]
    assert most[0] == 1


def test_a_request_while_another_runs_is_refused_with_429_and_retry_after(settings, worker):
    service = serving(settings, worker, http_max_waiting=0)
    slow: list = []
    with TestClient(create_app(service)) as client:
        job = {"input": {"prompt": "a slow fox", "num_inference_steps": 60, "seed": 1}}
        running = threading.Thread(target=lambda: slow.append(client.post("/generate", json=job)))
        running.start()
        deadline = time.monotonic() + 30
        while not service.gate.busy and time.monotonic() < deadline:
            time.sleep(0.01)
        response = client.post("/v1/images/generations", json={"prompt": "a"})
        assert "busy" in openai_error(response, 429, None)
        assert int(response.headers["retry-after"]) >= 1
        queued = client.post("/generate", json={"input": {"prompt": "a"}})
        assert queued.status_code == 429 and int(queued.headers["retry-after"]) >= 1
        running.join(60)
    assert slow[0].status_code == 200


def test_response_format_url_uploads_to_the_bucket_and_a_failed_upload_is_502(settings, s3_endpoint):
    import requests

    bucket = settings.model_copy(update={"bucket_endpoint_url": s3_endpoint, **KEYS})
    client = TestClient(create_app(serving(bucket, Worker(bucket))))
    body = {"prompt": "a fox", "response_format": "url", "n": 2, **SMALL}
    response = client.post("/v1/images/generations", json=body)
    assert response.status_code == 200, response.text[:500]
    urls = [item["url"] for item in response.json()["data"]]
    assert all(url.startswith(s3_endpoint) for url in urls) and response.json()["metrics"]["delivery"] == "bucket"
    assert Image.open(io.BytesIO(requests.get(urls[0], timeout=30).content)).size == (64, 64)
    assert (
        "b64_json"
        in client.post("/v1/images/generations", json={**body, "response_format": "b64_json"}).json()["data"][0]
    )

    refused = bucket.model_copy(update={"bucket_name": "no-such-bucket"})
    client = TestClient(create_app(serving(refused, Worker(refused))))
    assert "bucket upload failed" in openai_error(client.post("/v1/images/generations", json=body), 502, None)

"""The real TensorRT chain on a GPU: export, build, load, generate. Skipped where it cannot run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import run_export


def full_tensorrt_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    try:
        import tensorrt
    except ImportError:
        return "needs TensorRT's full libraries (pip install '.[gpu]')"
    return None if hasattr(tensorrt, "Builder") else "needs TensorRT's builder, not only the lean runtime"


pytestmark = [
    pytest.mark.tensorrt,
    pytest.mark.skipif(full_tensorrt_reason() is not None, reason=full_tensorrt_reason() or ""),
]


@pytest.fixture(scope="module")
def gpu_store(tmp_path_factory, cache_dir):
    engine_dir = tmp_path_factory.mktemp("gpu-engines")
    done = run_export(engine_dir, cache_dir, "--device", "cuda")
    assert done.returncode == 0, done.stderr[-3000:]
    return engine_dir


def test_networks_are_strongly_typed_on_the_real_bindings():
    import tensorrt as trt

    from export.tensorrt import network_flags

    if int(trt.__version__.split(".")[0]) >= 11:
        assert network_flags(trt) == 0  # TensorRT 11 builds nothing but strongly typed networks
        return
    assert network_flags(trt) == 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = trt.Builder(trt.Logger(trt.Logger.WARNING)).create_network(network_flags(trt))
    assert network.get_flag(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def images(response: dict) -> list[np.ndarray]:
    from perf.agreement import decode

    assert response["status"] == "success", response
    return [decode(item) for item in response["output"]]


def test_tensorrt_matches_torch_on_the_gpu(gpu_store, make_settings):
    """Before warm-up nothing is captured and every call enqueues; warm-up captures the optimum shapes;
    a one-image request (the optimum) then replays the UNet's graph at each of its steps, with the same
    images every time, within the fp16 bound of torch's (perf/agreement.py). Two images (batch 4, not
    the optimum's 2) run plainly: no replay."""
    from engine.serving.worker import Worker
    from perf.agreement import compare_images

    steps = 8
    one = {"prompt": "a fox", "num_inference_steps": steps, "seed": 3, "scheduler": "euler"}
    two = {**one, "num_images": 2}
    torch_worker = Worker(make_settings(device="cuda", backend="torch", engine_dir=gpu_store))
    reference = images(torch_worker.handle({"id": "r", "input": one}))
    reference_two = images(torch_worker.handle({"id": "r2", "input": two}))
    worker = Worker(make_settings(device="cuda", backend="tensorrt", engine_dir=gpu_store))

    def unet_graphs() -> tuple[int, int]:
        return worker.tensorrt.graph_counts()["unet"]

    cold = worker.handle({"id": "0", "input": one})
    assert unet_graphs() == (0, 0), "no graph before warm-up"
    worker.warmup()
    captured, replays = unet_graphs()
    assert captured >= 1 and replays == 0
    first = worker.handle({"id": "1", "input": one})
    assert unet_graphs() == (captured, steps), "each step at the optimum replays the captured graph"
    second = worker.handle({"id": "2", "input": one})
    assert unet_graphs() == (captured, 2 * steps)
    batched = worker.handle({"id": "3", "input": two})
    assert unet_graphs() == (captured, 2 * steps), "shapes other than the optimum enqueue plainly"
    for response in (cold, first, second, batched):
        assert set(response["metrics"]["backends"].values()) == {"tensorrt"}, response["metrics"]["fallbacks"]
    for candidate in (cold, first, second):
        for got, want in zip(images(candidate), reference, strict=True):
            diff = compare_images(got, want, "fp16")
            assert diff.passed, diff
    assert all(np.array_equal(a, b) for a, b in zip(images(first), images(second), strict=True)), "replays differ"
    for got, want in zip(images(batched), reference_two, strict=True):
        diff = compare_images(got, want, "fp16")
        assert diff.passed, diff


def test_a_request_outside_every_profile_falls_back_on_the_gpu(gpu_store, make_settings):
    from engine.serving.worker import Worker

    worker = Worker(make_settings(device="cuda", backend="tensorrt", engine_dir=gpu_store))
    response = worker.handle({"id": "w", "input": {"prompt": "a fox", "width": 256, "num_inference_steps": 2}})
    assert response["status"] == "success"
    assert response["metrics"]["backends"]["unet"] != "tensorrt"
    assert "profile" in response["metrics"]["fallbacks"]["unet"]


def test_cuda_graphs_alternating_shapes_match_plain_enqueues(gpu_store, make_settings):
    """A (captured at warm-up, replayed) and B (plain), alternated: each output equals a plain enqueue's,
    A's calls replay the graph and B's do not."""
    from engine.serving.worker import Worker

    graphed = Worker(make_settings(device="cuda", backend="tensorrt", engine_dir=gpu_store, cuda_graphs=True))
    graphed.warmup()
    plain = Worker(make_settings(device="cuda", backend="tensorrt", engine_dir=gpu_store, cuda_graphs=False))
    unet, reference = graphed.tensorrt.runners["unet"], plain.tensorrt.runners["unet"]
    engine = unet.engines[0]
    optimum = {name: shape.optimum for name, shape in engine.profiles[0].shapes().items()}
    other = {
        **optimum,
        "sample": (1, *optimum["sample"][1:]),
        "encoder_hidden_states": (1, *optimum["encoder_hidden_states"][1:]),
    }
    assert any(slot.graph is not None for slot in engine.slots.values()), "the warm-up captured the optimum"
    generator = torch.Generator(device="cuda").manual_seed(0)
    replays, warm = [], engine.graph_replays
    for shapes in (optimum, other, optimum, other):
        inputs = {name: torch.randn(shape, generator=generator, device="cuda") for name, shape in shapes.items()}
        inputs["timestep"] = torch.full(shapes["timestep"], 500.0, device="cuda")
        got, want = unet(inputs)["noise_pred"], reference(inputs)["noise_pred"]
        assert torch.allclose(got.float(), want.float(), atol=1e-2, rtol=0), shapes
        replays.append(engine.graph_replays - warm)
    assert replays == [1, 1, 2, 2], "the optimum replays its graph, the other shape enqueues"


LORA_MIN_MEAN_CHANGE = 1.5 / 255
"""How far LoRAs a 0.9 + b 0.5 (rank 4) must move the tiny model's image from its base, on average per
channel: torch fp32 on the CPU moves it 2.6-3.0/255 with euler (seeds 3 and 4; perf/agreement.py), the
fp16 agreement bound's mean is 1/255 and bf16 against fp32 is 0.6-0.7/255. Less means the refit did not
take."""


def test_lora_refits_match_torch_and_leave_no_trace_on_the_gpu(gpu_store, make_settings, cache_dir, tmp_path):
    """Refitted engines against the torch backend with the same LoRAs: the LoRA image differs from the base by
    the stated margin (on both backends) and matches torch's; then A -> B -> A and back to base, bit for bit."""
    from engine.models.model import load_model
    from engine.serving.worker import Worker
    from perf.agreement import compare_images
    from perf.lora_files import write_pair

    write_pair(load_model("tiny", cache_dir), tmp_path, rank=4)
    base = {"prompt": "a fox", "num_inference_steps": 6, "seed": 4, "scheduler": "euler"}
    a = {**base, "loras": [{"name": "a", "scale": 0.9}, {"name": "b", "scale": 0.5}]}
    b = {**base, "loras": [{"name": "b", "scale": -1.0}]}
    reference = Worker(make_settings(device="cuda", backend="torch", engine_dir=gpu_store, lora_dir=tmp_path))
    torch_base = images(reference.handle({"id": "rb", "input": base}))
    torch_a = images(reference.handle({"id": "ra", "input": a}))
    worker = Worker(make_settings(device="cuda", backend="tensorrt", engine_dir=gpu_store, lora_dir=tmp_path))
    worker.warmup()  # captures CUDA graphs, which every refit must recapture
    base_image = images(worker.handle({"id": "0", "input": base}))
    captured, replays = worker.tensorrt.graph_counts()["unet"]
    first_a = worker.handle({"id": "1", "input": a})
    captured_a, replays_a = worker.tensorrt.graph_counts()["unet"]
    assert captured_a > captured, "the refit captured the graphs again"
    assert replays_a - replays == base["num_inference_steps"], "and the LoRA's steps replayed them"
    assert set(first_a["metrics"]["backends"].values()) == {"tensorrt"}, first_a["metrics"]["fallbacks"]
    for lora, plain, want, torch_plain in zip(images(first_a), base_image, torch_a, torch_base, strict=True):
        assert compare_images(want, torch_plain).mean_abs >= LORA_MIN_MEAN_CHANGE, "torch's LoRA changed little"
        moved = compare_images(lora, plain)
        assert moved.mean_abs >= LORA_MIN_MEAN_CHANGE and not moved.passed, f"the LoRA changed too little: {moved}"
        diff = compare_images(lora, want, "fp16")
        assert diff.passed, diff
    worker.handle({"id": "2", "input": b})
    second_a = images(worker.handle({"id": "3", "input": a}))
    assert all(np.array_equal(x, y) for x, y in zip(second_a, images(first_a), strict=True))
    after = images(worker.handle({"id": "4", "input": base}))
    assert all(np.array_equal(x, y) for x, y in zip(after, base_image, strict=True))


def test_long_weighted_prompts_run_on_the_engines_prompt_axis(gpu_store, make_settings):
    """A 3-chunk prompt (231 tokens in the UNet) runs on the engines' dynamic prompt axis, as torch does."""
    from engine.serving.worker import Worker
    from perf.agreement import compare_images

    prompt = "(a watercolor fox:1.2) in the snow, " * 5 + "BREAK [pine forest], dusk light, fine detail"
    payload = {"prompt": prompt, "negative_prompt": "(blurry:1.3)", "num_inference_steps": 6, "seed": 5}
    request = {"id": "l", "input": payload}
    reference = Worker(make_settings(device="cuda", backend="torch", engine_dir=gpu_store)).handle(request)
    response = Worker(make_settings(device="cuda", backend="tensorrt", engine_dir=gpu_store)).handle(request)
    assert response["metrics"]["prompt_chunks"] == 3
    assert set(response["metrics"]["backends"].values()) == {"tensorrt"}, response["metrics"]["fallbacks"]
    for candidate, expected in zip(images(response), images(reference), strict=True):
        diff = compare_images(candidate, expected, "fp16")
        assert diff.passed, diff


def test_a_bf16_checkpoint_runs_bf16_engines(tmp_path, cache_dir, make_settings):
    """A Flux folder stored in bf16: its transformer and T5 engines are bf16 (strongly typed, from the graph),
    CLIP and the VAE fp16, and the images match torch running the same precisions."""
    from engine.serving.worker import Worker
    from perf.agreement import compare_images
    from tests.parity import bf16_flux

    model = str(bf16_flux(cache_dir, tmp_path / "bf16-flux"))
    done = run_export(tmp_path / "engines", cache_dir, "--device", "cuda", "--model", model)
    assert done.returncode == 0, done.stderr[-3000:]
    request = {
        "id": "b",
        "input": {"prompt": "a fox", "num_inference_steps": 6, "seed": 2, "width": 512, "height": 512},
    }
    common = {"model": model, "device": "cuda", "engine_dir": tmp_path / "engines"}
    reference = Worker(make_settings(backend="torch", **common)).handle(request)
    response = Worker(make_settings(backend="tensorrt", **common)).handle(request)
    assert set(response["metrics"]["backends"].values()) == {"tensorrt"}, response["metrics"]["fallbacks"]
    precisions = response["metrics"]["precisions"]
    wanted = {"transformer": "bf16", "text_encoder_2": "bf16", "text_encoder": "fp16"}
    assert {name: precisions[name] for name in wanted} == wanted
    for candidate, expected in zip(images(response), images(reference), strict=True):
        diff = compare_images(candidate, expected, "bf16")
        assert diff.passed, diff


def test_controlnets_run_on_their_own_engines_and_the_controlled_unets(tmp_path, cache_dir, make_settings):
    """Two ControlNets, each built into its own engine with the controlled UNet, against torch on the GPU;
    the last steps, where neither acts, run the plain UNet's engine."""
    from engine.models.model import load_model
    from engine.serving.worker import Worker
    from perf.agreement import compare_images
    from tests.parity import picture, to_base64
    from tests.test_controlnet import make_controlnet

    controlnet_dir, store = tmp_path / "controlnets", tmp_path / "engines"
    folder = load_model("tiny", cache_dir).folder
    make_controlnet(folder, controlnet_dir / "edges", seed=1)
    make_controlnet(folder, controlnet_dir / "depth", seed=2)
    done = run_export(store, cache_dir, "--device", "cuda", "--controlnets", "edges", "depth", "--components", "unet")
    assert done.returncode == 0, done.stderr[-3000:]
    image = to_base64(picture(64, 64))
    controlnets = [
        {"name": "edges", "image": image, "end": 0.5},
        {"name": "depth", "image": image, "scale": 0.6, "end": 0.75},
    ]
    request = {"id": "c", "input": {"prompt": "a fox", "num_inference_steps": 6, "seed": 2, "controlnets": controlnets}}
    settings = {"device": "cuda", "engine_dir": store, "controlnet_dir": controlnet_dir}
    reference = Worker(make_settings(backend="torch", **settings)).handle(request)
    response = Worker(make_settings(backend="tensorrt", **settings)).handle(request)
    backends = response["metrics"]["backends"]
    for component in ("controlnet.edges", "controlnet.depth", "unet_controlled", "unet"):
        assert backends[component] == "tensorrt", response["metrics"]["fallbacks"]
    for candidate, expected in zip(images(response), images(reference), strict=True):
        diff = compare_images(candidate, expected, "fp16")
        assert diff.passed, diff


@pytest.mark.parametrize(("model", "size"), [("tiny-sd3", 128), ("tiny-flux", 512)])
def test_transformer_families_run_on_their_engines(tmp_path, cache_dir, make_settings, model, size):
    """SD3's and Flux's transformers, T5 and CLIP encoders built into engines (T5 in fp32), against torch."""
    from engine.serving.worker import Worker
    from perf.agreement import compare_images

    done = run_export(tmp_path, cache_dir, "--device", "cuda", "--model", model)
    assert done.returncode == 0, done.stderr[-3000:]
    payload = {"prompt": "a fox", "num_inference_steps": 6, "seed": 2, "width": size, "height": size}
    request = {"id": "f", "input": payload}
    reference = Worker(make_settings(model=model, device="cuda", backend="torch", engine_dir=tmp_path)).handle(request)
    response = Worker(make_settings(model=model, device="cuda", backend="tensorrt", engine_dir=tmp_path)).handle(
        request
    )
    assert set(response["metrics"]["backends"].values()) == {"tensorrt"}, response["metrics"]["fallbacks"]
    for candidate, expected in zip(images(response), images(reference), strict=True):
        diff = compare_images(candidate, expected, "fp16")
        assert diff.passed, diff

"""Profiles from configured ranges, and the engine chosen for a request: pure logic, no TensorRT."""

from __future__ import annotations

import pytest

from engine.models.controlnet import ResidualLayout, controlled_unet_spec
from engine.sizes import SizeRange, default_ranges, parse_ranges
from engine.spec import ComponentSpec, Dims, TensorSpec
from engine.store.profiles import Profile, choose, profile_for

UNET = ComponentSpec(
    name="unet",
    inputs=(
        TensorSpec("sample", ("batch", 4, "latent_height", "latent_width")),
        TensorSpec("timestep", (1,), keep_fp32=True),
        TensorSpec("encoder_hidden_states", ("batch", 77, 768)),
    ),
    outputs=(TensorSpec("noise_pred", ("batch", 4, "latent_height", "latent_width")),),
    batch_multiplier=2,
)
VAE = ComponentSpec(
    name="vae_decoder",
    inputs=(TensorSpec("latent", ("batch", 4, "latent_height", "latent_width")),),
    outputs=(TensorSpec("images", ("batch", 3, "height", "width")),),
)


def test_ranges_parse_and_label():
    assert SizeRange.parse("256-1024@512x4") == SizeRange(256, 512, 1024, 4)
    assert SizeRange.parse("512x1").static
    assert SizeRange.parse("512x1").label == "512x1"
    ranges = parse_ranges("256-768@512x2, 512x1", 512, max_images=4)
    assert ranges == [SizeRange(256, 512, 768, 2), SizeRange(512, 512, 512, 1)]


@pytest.mark.parametrize("text", ["", "512", "1024-256@512x4", "256-1024@2000x4", "256-1024@512x0", "250-1024@512x4"])
def test_bad_ranges_are_rejected(text):
    with pytest.raises(ValueError, match="engine profile"):
        SizeRange.parse(text)


def test_default_range_follows_the_native_size_and_covers_max_images():
    assert default_ranges(512, 4) == [SizeRange(256, 512, 768, 4)]
    assert default_ranges(1024, 4) == [SizeRange(512, 1024, 1536, 4)]
    assert default_ranges(64, 2) == [SizeRange(64, 64, 96, 2)]
    assert parse_ranges(None, 512, max_images=6) == [SizeRange(256, 512, 768, 6)]


def test_the_default_profiles_cover_every_batch_the_default_limits_accept(make_settings, cache_dir):
    """MAX_IMAGES images doubled for guidance in the UNet; negatives and prompts in the text encoder."""
    from engine.models.model import load_model
    from engine.spec import Dims

    settings = make_settings()
    model = load_model("tiny", cache_dir)
    [size_range] = parse_ranges(settings.engine_profiles, model.config.native_size, settings.max_images)
    native = model.config.native_size
    chunks = settings.max_prompt_chunks
    for component, rows in (("unet", settings.max_images), ("text_encoder", settings.max_prompts)):
        spec = model.specs[component]
        profile = profile_for(spec, size_range, chunks)
        for prompt_chunks in range(1, chunks + 1):
            shapes = spec.input_shapes(Dims(rows, native, native, prompt_chunks), guidance=True)
            assert profile.unsupported_reason(shapes) is None, (component, prompt_chunks)
    unet = model.specs["unet"]
    longer = unet.input_shapes(Dims(1, native, native, chunks + 1), guidance=False)
    assert "encoder_hidden_states axis 1" in profile_for(unet, size_range, chunks).unsupported_reason(longer)


def test_prompt_length_sets_the_text_encoders_rows_and_the_unets_sequence(cache_dir):
    from engine.models.model import load_model

    specs = load_model("tiny-sdxl", cache_dir).specs
    dims = Dims(2, 64, 64, prompt_chunks=3)
    assert specs["text_encoder"].input_shapes(dims)["input_ids"] == (2 * 2 * 3, 77)
    assert specs["text_encoder_2"].output_shapes(dims)["text_embeds"][0] == 2 * 2 * 3
    unet = specs["unet"].input_shapes(dims)
    assert unet["encoder_hidden_states"][:2] == (4, 231)
    assert unet["text_embeds"][0] == unet["time_ids"][0] == 4
    profile = profile_for(specs["unet"], SizeRange(64, 64, 96, 2), max_prompt_chunks=3)
    assert profile.label == "64-96@64x2+231tok"
    hidden = profile.shapes()["encoder_hidden_states"]
    assert (hidden.minimum[1], hidden.optimum[1], hidden.maximum[1]) == (77, 77, 231)
    assert profile_for(specs["vae_decoder"], SizeRange(64, 64, 96, 2), max_prompt_chunks=3).label == "64-96@64x2"


def test_unet_profile_is_in_latent_units_with_guidance_doubling():
    profile = profile_for(UNET, SizeRange(256, 512, 1024, 4)).shapes()
    assert profile["sample"].minimum == (1, 4, 32, 32)
    assert profile["sample"].optimum == (2, 4, 64, 64)
    assert profile["sample"].maximum == (8, 4, 128, 128)
    assert profile["encoder_hidden_states"].maximum == (8, 77, 768)
    assert profile["timestep"].minimum == profile["timestep"].maximum == (1,)


def test_vae_profile_has_no_guidance_doubling():
    profile = profile_for(VAE, SizeRange(256, 512, 1024, 4)).shapes()
    assert profile["latent"].minimum == (1, 4, 32, 32)
    assert profile["latent"].maximum == (4, 4, 128, 128)


def test_static_profile_is_one_shape():
    profile = profile_for(UNET, SizeRange.parse("512x1")).shapes()
    assert profile["sample"].minimum == profile["sample"].optimum == profile["sample"].maximum == (2, 4, 64, 64)


def test_coverage_and_reasons():
    profile = profile_for(UNET, SizeRange(256, 512, 768, 2))
    assert profile.unsupported_reason(UNET.input_shapes(Dims(2, 512, 768))) is None
    assert profile.unsupported_reason(UNET.input_shapes(Dims(1, 512, 512), guidance=False)) is None
    reason = profile.unsupported_reason(UNET.input_shapes(Dims(1, 1024, 512)))
    assert reason == "profile 256-768@512x2: sample axis 2 is 128, the engine covers 32..96"
    assert "axis 0 is 6" in profile.unsupported_reason(UNET.input_shapes(Dims(3, 512, 512)))


def test_the_covering_engine_tuned_closest_is_chosen():
    dynamic = profile_for(UNET, SizeRange(256, 512, 1024, 4))
    static = profile_for(UNET, SizeRange.parse("512x1"))
    wide = profile_for(UNET, SizeRange(512, 768, 1024, 1))
    profiles = [dynamic, static, wide]
    assert choose(profiles, UNET.input_shapes(Dims(1, 512, 512))) == 1
    assert choose(profiles, UNET.input_shapes(Dims(1, 768, 768))) == 2
    assert choose(profiles, UNET.input_shapes(Dims(3, 512, 512))) == 0
    assert choose(profiles, UNET.input_shapes(Dims(1, 2048, 512))) is None


def test_profiles_survive_the_manifest():
    profile = profile_for(UNET, SizeRange(256, 512, 1024, 4))
    assert Profile.from_json(profile.to_json()) == profile


SD15_UNET_CONFIG = {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2}


def test_controlnet_residuals_follow_the_unets_downsamplers_which_round_up():
    """SD 1.5's 12 down residuals and mid residual; a 72x56 latent (576x448 pixels) halves to 36x28,
    18x14, then 9x7: the shapes diffusers' UNet produces, so the controlled UNet's profile covers them."""
    layout = ResidualLayout.of(SD15_UNET_CONFIG)
    assert len(layout.down) == 12
    assert layout.down[-1] == (1280, 8) and layout.mid == (1280, 8)
    controlled = controlled_unet_spec(UNET, SD15_UNET_CONFIG)
    shapes = controlled.input_shapes(Dims(1, 576, 440))
    assert shapes["down_residual_0"] == (2, 320, 72, 55)
    assert shapes["down_residual_3"] == (2, 320, 36, 28)
    assert shapes["mid_residual"] == (2, 1280, 9, 7)
    profile = profile_for(controlled, SizeRange(256, 512, 768, 2))
    mid = profile.shapes()["mid_residual"]
    assert (mid.minimum, mid.optimum, mid.maximum) == ((1, 1280, 4, 4), (2, 1280, 8, 8), (4, 1280, 12, 12))
    assert profile.unsupported_reason(shapes) is None

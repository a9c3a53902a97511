"""Long, weighted and BREAK prompts through both families, against references we did not write.

compel (``truncate_long_prompts=False``, split at exactly 75 tokens) encodes long prompts
the way the lpw pipelines and AUTOMATIC1111 do: chunks of BOS + 75 tokens + EOS + padding,
joined on the sequence axis, shorter prompts padded with empty chunks. Its weighting is
its own (a blend towards the empty prompt), so it is the reference for unweighted long
prompts only. Its SDXL pooled embedding is the first chunk's (AUTOMATIC1111's choice);
the worker takes the last chunk's, as lpw_stable_diffusion_xl does.

The tiny models' tokenizer spells words out, so 200 characters are about 170 tokens.
"""

from __future__ import annotations

import re

import pytest
import torch
from compel import Compel, ReturnedEmbeddingsType
from compel.embeddings_provider import SplitLongTextMode

from engine.common.errors import RequestError
from engine.prompts.tokens import chunked_inputs, tokenize_prompt
from tests.prompts.conftest import conditioning

LONG = (
    "a watercolor painting of a lighthouse on a rocky coast at dusk, seagulls over the waves, warm light "
    "in the windows, fishing boats in the harbor, clouds lit orange and violet, fine detail, soft brush"
)
NEGATIVE = "blurry, low quality"


def sd_compel(pipe) -> Compel:
    return Compel(
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        truncate_long_prompts=False,
        split_long_text_mode=SplitLongTextMode.BRUTAL,
    )


def sdxl_compel(pipe) -> Compel:
    return Compel(
        tokenizer=[pipe.tokenizer, pipe.tokenizer_2],
        text_encoder=[pipe.text_encoder, pipe.text_encoder_2],
        returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
        requires_pooled=[False, True],
        truncate_long_prompts=False,
        split_long_text_mode=SplitLongTextMode.BRUTAL,
    )


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_a_prompt_of_one_chunk_is_tokenized_exactly_as_diffusers_does(request, family):
    worker, pipe = request.getfixturevalue(family)
    for name in worker.model.family.tokenizers:
        tokenizer = worker.model.tokenizers[name]
        for text in ("a red fox", "", "x" * 75, "a (red) fox, [blurry] \\(sic\\)"):
            ids, weights = chunked_inputs(tokenizer, [tokenize_prompt(tokenizer, text, "plain")], 1)
            reference = getattr(pipe, name)  # diffusers' own copy of the tokenizer
            expected = reference(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
            assert torch.equal(ids, expected.input_ids), (name, text)
            assert bool((weights == 1.0).all())


def test_sd_short_prompts_give_diffusers_embeddings(sd):
    worker, pipe = sd
    ours = conditioning(worker, "a red fox", NEGATIVE)["encoder_hidden_states"]
    with torch.no_grad():
        positive, negative = pipe.encode_prompt("a red fox", "cpu", 1, True, NEGATIVE)
    torch.testing.assert_close(ours, torch.cat([negative, positive]), rtol=0, atol=1e-6)


def test_sd_long_prompts_match_compel(sd):
    worker, pipe = sd
    ours = conditioning(worker, LONG, NEGATIVE)["encoder_hidden_states"]
    compel = sd_compel(pipe)
    with torch.no_grad():
        positive, negative = compel.pad_conditioning_tensors_to_same_length([compel(LONG), compel(NEGATIVE)])
    assert ours.shape[1] == positive.shape[1] == 77 * 3
    torch.testing.assert_close(ours, torch.cat([negative, positive]), rtol=0, atol=1e-5)


def test_sdxl_long_prompts_match_compel_and_pool_the_last_chunk(sdxl):
    worker, pipe = sdxl
    ours = conditioning(worker, LONG, NEGATIVE)
    compel = sdxl_compel(pipe)
    with torch.no_grad():
        (positive, pooled), (negative, negative_pooled), (empty, _) = compel(LONG), compel(NEGATIVE), compel("")
    negative = torch.cat([negative, empty, empty], dim=1)  # padded with empty chunks, as compel pads one encoder
    assert ours["encoder_hidden_states"].shape[1] == 77 * 3
    torch.testing.assert_close(ours["encoder_hidden_states"], torch.cat([negative, positive]), rtol=0, atol=1e-5)
    # The negative prompt fits one chunk, so its first chunk is its last: compel pools the same one.
    torch.testing.assert_close(ours["text_embeds"][0], negative_pooled[0], rtol=0, atol=1e-5)
    # The prompt's pooled embedding is its third chunk's, straight from diffusers' encoder.
    tokenizer = pipe.tokenizer_2
    ids, _ = chunked_inputs(tokenizer, [tokenize_prompt(tokenizer, LONG)], 3)
    with torch.no_grad():
        last_chunk = pipe.text_encoder_2(ids[2:3]).text_embeds[0]
    torch.testing.assert_close(ours["text_embeds"][1], last_chunk, rtol=0, atol=1e-5)
    assert not torch.allclose(ours["text_embeds"][1], pooled[0], atol=1e-3), "the first chunk pools differently"


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_weights_scale_tokens_and_keep_the_prompts_mean(request, family):
    worker, _ = request.getfixturevalue(family)
    plain = conditioning(worker, "a fox in the snow", "")["encoder_hidden_states"][1]
    weighted = conditioning(worker, "a (fox:1.5) in the [snow]", "")["encoder_hidden_states"][1]
    assert plain.shape == weighted.shape
    assert not torch.allclose(plain, weighted)
    width = plain.shape[-1] // len(worker.model.family.text_encoders)
    for part in range(len(worker.model.family.text_encoders)):  # each encoder's embeddings keep their mean
        columns = slice(part * width, (part + 1) * width)
        torch.testing.assert_close(weighted[:, columns].mean(), plain[:, columns].mean(), rtol=1e-5, atol=1e-6)
    explicit_one = conditioning(worker, "a (fox:1) in the snow", "")["encoder_hidden_states"]
    assert torch.equal(explicit_one, conditioning(worker, "a fox in the snow", "")["encoder_hidden_states"])


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_plain_syntax_reads_brackets_and_break_as_text(request, family):
    worker, _ = request.getfixturevalue(family)
    plain = conditioning(worker, "a (fox:1.5) [snow]", "", syntax="plain")
    escaped = conditioning(worker, "a \\(fox:1.5\\) \\[snow\\]", "")
    assert torch.equal(plain["encoder_hidden_states"], escaped["encoder_hidden_states"])
    assert conditioning(worker, "a fox BREAK snow", syntax="plain")["encoder_hidden_states"].shape[1] == 77
    assert conditioning(worker, "a fox BREAK snow")["encoder_hidden_states"].shape[1] == 77 * 2


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_break_encodes_each_part_as_its_own_chunk(request, family):
    worker, _ = request.getfixturevalue(family)
    joined = conditioning(worker, "a red fox BREAK in the snow", "")
    first = conditioning(worker, "a red fox", "")
    second = conditioning(worker, "in the snow", "")
    expected = torch.cat([first["encoder_hidden_states"], second["encoder_hidden_states"]], dim=1)
    torch.testing.assert_close(joined["encoder_hidden_states"][1], expected[1], rtol=0, atol=1e-6)
    if "text_embeds" in joined:
        torch.testing.assert_close(joined["text_embeds"][1], second["text_embeds"][1], rtol=0, atol=1e-6)


def test_one_negative_prompt_too_long_is_named_once_however_many_prompts_it_serves(sd):
    worker, _ = sd
    payload = {"prompt": ["a fox", "a cat", "a hare"], "negative_prompt": "blur " * 300}
    with pytest.raises(RequestError) as refused:
        worker.admission.admit(payload)
    rule = r"negative_prompt: \d+ tokens make \d+ chunks of 75; at most \d+ \(\d+ tokens, MAX_PROMPT_CHUNKS\)"
    assert re.fullmatch(rule, str(refused.value)), refused.value

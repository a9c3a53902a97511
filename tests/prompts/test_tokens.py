"""Chunking and weighting, on the tiny models' tokenizer (one token per character, a word's
last character carrying CLIP's end-of-word mark: 'abc' is three tokens)."""

from __future__ import annotations

import pytest
import torch

from engine.models.builtin_parts import byte_tokenizer
from engine.prompts.tokens import apply_weights, chunk_count, chunked_inputs, prompt_lengths, tokenize_prompt


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def sizes(tokenizer, prompt: str, syntax: str = "a1111") -> list[int]:
    return [len(chunk) for chunk in tokenize_prompt(tokenizer, prompt, syntax).chunks]


def test_chunks_hold_75_tokens_and_a_new_one_starts_at_the_76th(tokenizer):
    assert sizes(tokenizer, "x" * 75) == [75]
    assert sizes(tokenizer, "x" * 76) == [75, 1]
    assert sizes(tokenizer, "x" * 225) == [75, 75, 75]
    assert sizes(tokenizer, "") == [0]


def test_break_closes_the_chunk_as_automatic1111_does(tokenizer):
    assert sizes(tokenizer, "ab BREAK cd") == [2, 2]
    assert sizes(tokenizer, "BREAK ab") == [0, 2], "a leading BREAK leaves an empty first chunk"
    assert sizes(tokenizer, "ab BREAK") == [2], "a trailing BREAK adds nothing"
    assert sizes(tokenizer, "ab BREAK BREAK cd") == [2, 0, 2]
    assert sizes(tokenizer, "x" * 75 + " BREAK cd") == [75, 2], "a full chunk is not followed by an empty one"
    assert sizes(tokenizer, "ab BREAK cd", "plain") == [9]


def test_weights_follow_their_tokens_across_chunks(tokenizer):
    tokens = tokenize_prompt(tokenizer, "x" * 74 + " (abc:1.5) de")
    assert tokens.weights[0][-1] == 1.5 and tokens.weights[1][:2] == (1.5, 1.5)
    assert tokens.weights[1][2:] == (1.0, 1.0)
    assert tokens.count == 79


def test_rows_are_padded_with_empty_chunks_in_diffusers_layout(tokenizer):
    rows = [tokenize_prompt(tokenizer, "x" * 80), tokenize_prompt(tokenizer, "(ab)")]
    assert chunk_count(rows) == 2
    ids, weights = chunked_inputs(tokenizer, rows, 2)
    assert ids.shape == (4, 77) and weights.shape == (2, 154)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    empty = tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    assert torch.equal(ids[3], empty), "the shorter prompt's second chunk is the empty prompt"
    assert ids[0, 0] == ids[1, 0] == bos and ids[0, 76] == eos
    assert ids[1, :8].tolist() == [bos, *tokenize_prompt(tokenizer, "x" * 80).chunks[1], eos, pad]
    assert weights[1, 1:3].tolist() == pytest.approx([1.1, 1.1]) and weights[1, 3:].eq(1).all()


def test_a_pad_token_other_than_eos_pads_after_eos(tokenizer):
    second = byte_tokenizer()
    second.pad_token = "!"  # as SDXL's second tokenizer
    ids, _ = chunked_inputs(second, [tokenize_prompt(second, "ab")], 1)
    expected = second("ab", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ids, expected)
    assert ids[0, 3] == second.eos_token_id and ids[0, 4] == second.pad_token_id != second.eos_token_id


def test_lengths_are_the_most_any_tokenizer_gives(tokenizer):
    rows = {"tokenizer": [tokenize_prompt(tokenizer, "x" * 80)], "other": [tokenize_prompt(tokenizer, "x" * 160)]}
    [length] = prompt_lengths(rows)
    assert (length.tokens, length.chunks) == (160, 3)


def test_weights_multiply_tokens_and_keep_each_prompts_mean():
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(2, 154, 8, generator=generator) + 0.5
    weights = torch.ones(2, 154)
    weights[0, 3:6] = 1.5
    weighted = apply_weights(embeddings, weights)
    assert torch.equal(weighted[1], embeddings[1]), "an unweighted row is untouched"
    torch.testing.assert_close(weighted[0].mean(), embeddings[0].mean())
    ratio = weighted[0, 3] / embeddings[0, 3]
    torch.testing.assert_close(ratio, torch.full_like(ratio, ratio[0].item()))
    torch.testing.assert_close(weighted[0, 3] / weighted[0, 0], 1.5 * embeddings[0, 3] / embeddings[0, 0])
    assert apply_weights(embeddings, torch.ones(2, 154)) is embeddings


def test_embeddings_that_average_to_zero_are_only_multiplied():
    embeddings = torch.randn(1, 77, 8)
    embeddings = embeddings - embeddings.mean()  # an untrained final LayerNorm's output
    weights = torch.ones(1, 77)
    weights[0, 1] = 2.0
    weighted = apply_weights(embeddings, weights)
    assert torch.isfinite(weighted).all()
    torch.testing.assert_close(weighted[0, 1], 2 * embeddings[0, 1])
    torch.testing.assert_close(weighted[0, 2:], embeddings[0, 2:])


def test_fp16_embeddings_are_weighted_in_fp32_and_keep_their_type():
    embeddings = (torch.randn(1, 77, 8) + 1).half()
    weights = torch.ones(1, 77)
    weights[0, 5] = 0.5
    weighted = apply_weights(embeddings, weights)
    assert weighted.dtype == torch.float16
    expected = apply_weights(embeddings.float(), weights).half()
    assert torch.equal(weighted, expected)

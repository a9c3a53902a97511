"""Prompts as chunks of CLIP tokens, with a weight per token, and the embeddings those weights shape.

A prompt's tokens are split into chunks of 75 (at ``BREAK`` too). Each chunk goes through
the text encoder on its own as BOS + 75 tokens + EOS + padding, laid out exactly as
diffusers tokenizes a short prompt, so a prompt of one chunk gives diffusers' embeddings.
The chunks' embeddings are joined along the sequence axis. Rows of one batch (prompts and
negative prompts) are padded with empty chunks to the same count.

This follows diffusers' community ``lpw_stable_diffusion`` pipeline and AUTOMATIC1111, and
where they differ, lpw: chunks split at exactly 75 tokens (AUTOMATIC1111 moves the words
after a late comma into the next chunk); the weighted embeddings keep the mean of the
whole prompt's embeddings (AUTOMATIC1111 keeps each chunk's). Where lpw puts EOS last
after the padding (tokenizers whose pad token is not EOS, such as SD 2.x's), the chunk has
diffusers' layout, the one AUTOMATIC1111 also uses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from engine.prompts.syntax import Fragment, PromptSyntax, parse_weights

"""``a1111``: weights and BREAK as AUTOMATIC1111 reads them; ``plain``: the text as it is."""


@dataclass(frozen=True)
class WeightedTokens:
    """One prompt's token ids in chunks (no BOS, EOS or padding), and the weight of each token."""

    chunks: tuple[tuple[int, ...], ...]
    weights: tuple[tuple[float, ...], ...]

    @property
    def count(self) -> int:
        return sum(len(chunk) for chunk in self.chunks)


def content_length(tokenizer: Any) -> int:
    """Tokens a chunk holds between its BOS and EOS: 75 for CLIP."""
    return tokenizer.model_max_length - 2


def tokenize_prompt(tokenizer: Any, prompt: str, syntax: PromptSyntax = "a1111") -> WeightedTokens:
    """The prompt's chunks: a new one every 75 tokens and at each BREAK; a trailing empty one is dropped."""
    fragments = parse_weights(prompt) if syntax == "a1111" else (Fragment(prompt),)
    # One call for each distinct text: a prompt can hold thousands of fragments, and each call costs.
    texts = list(dict.fromkeys(fragment.text for fragment in fragments if not fragment.breaks_chunk))
    token_ids = dict(zip(texts, tokenizer(texts, add_special_tokens=False, verbose=False).input_ids, strict=True))
    size = content_length(tokenizer)
    chunks: list[list[int]] = [[]]
    weights: list[list[float]] = [[]]
    for fragment in fragments:
        if fragment.breaks_chunk:
            chunks.append([])
            weights.append([])
            continue
        for token in token_ids[fragment.text]:
            if len(chunks[-1]) == size:
                chunks.append([])
                weights.append([])
            chunks[-1].append(token)
            weights[-1].append(fragment.weight)
    if len(chunks) > 1 and not chunks[-1]:
        chunks.pop()
        weights.pop()
    return WeightedTokens(tuple(map(tuple, chunks)), tuple(map(tuple, weights)))


def chunk_count(rows: Sequence[WeightedTokens]) -> int:
    return max(len(row.chunks) for row in rows)


def chunked_inputs(tokenizer: Any, rows: Sequence[WeightedTokens], chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids, one row per chunk (``rows x chunks`` of them), and the weights of the joined
    sequence of each prompt (``rows x chunks * model_max_length``); BOS, EOS and padding weigh 1."""
    length = tokenizer.model_max_length
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids: list[list[int]] = []
    weights: list[list[float]] = []
    for row in rows:
        sequence: list[float] = []
        for index in range(chunks):
            tokens = row.chunks[index] if index < len(row.chunks) else ()
            token_weights = row.weights[index] if index < len(row.weights) else ()
            padding = length - 2 - len(tokens)
            ids.append([tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id, *[pad] * padding])
            sequence += [1.0, *token_weights, 1.0, *[1.0] * padding]
        weights.append(sequence)
    return torch.tensor(ids, dtype=torch.int64), torch.tensor(weights, dtype=torch.float32)


def joined(chunk_embeddings: torch.Tensor, rows: int) -> torch.Tensor:
    """``rows x chunks`` chunk embeddings (chunk, token, feature) as ``rows`` sequences of all their chunks."""
    return chunk_embeddings.reshape(rows, -1, chunk_embeddings.shape[-1])


MEAN_FLOOR = 1e-4
"""A mean this small against the embeddings' spread is zero but for rounding: restoring it would
scale by noise (and lpw divides zero by zero). Untrained text encoders average to zero; trained
ones do not, their final LayerNorm has a learned bias."""


def apply_weights(embeddings: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each token's embedding times its weight, then scaled so each prompt keeps its mean, as lpw does.

    Computed in fp32 whatever the encoder ran at; unweighted prompts come back untouched, and a
    prompt whose embeddings average to zero is only multiplied (see ``MEAN_FLOOR``).
    """
    if bool((weights == 1.0).all()):
        return embeddings
    values = embeddings.float()
    before = values.mean(dim=(-2, -1), keepdim=True)
    values = values * weights.to(values.device).unsqueeze(-1)
    after = values.mean(dim=(-2, -1), keepdim=True)
    spread = values.std(dim=(-2, -1), keepdim=True)
    degenerate = (before.abs() < MEAN_FLOOR * spread) | (after.abs() < MEAN_FLOOR * spread)
    ratio = torch.where(degenerate, torch.ones_like(before), before / after)
    return (values * ratio).to(embeddings.dtype)


@dataclass(frozen=True)
class PromptLength:
    tokens: int
    chunks: int


def prompt_lengths(tokenized: Mapping[str, Sequence[WeightedTokens]]) -> list[PromptLength]:
    """Each prompt's tokens and chunks, the most that any of the model's tokenizers gives it."""
    per_prompt = zip(*tokenized.values(), strict=True)
    return [PromptLength(max(t.count for t in rows), max(len(t.chunks) for t in rows)) for rows in per_prompt]

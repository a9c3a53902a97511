"""The parts the built-in models are made of: byte-level CLIP and T5 tokenizers, small text encoders,
a small VAE and Stable Diffusion's scheduler, each built offline with random weights."""

from __future__ import annotations

import torch

TEXT_HIDDEN = 32
"""The width of the built-in models' CLIP text encoders."""


def byte_tokenizer():
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    # Byte-level characters with and without CLIP's end-of-word marker and no merges:
    # every word is spelled out, which is all a random model needs.
    chars = sorted(ByteLevel.alphabet())
    tokens = [*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


def clip_text_encoder(
    tokenizer, hidden: int = TEXT_HIDDEN, with_projection: bool = False, vocab_size: int | None = None
):
    """A small CLIP text encoder; ``vocab_size`` above the tokenizer's makes a large embedding table."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab_size or len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu",
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    encoder = cls(config)
    # A trained final LayerNorm has a bias, so its embeddings do not average to zero; prompt
    # weighting keeps that average, which an untrained (zero) bias would leave undefined.
    bias = next(value for name, value in encoder.named_parameters() if name.endswith("final_layer_norm.bias"))
    torch.nn.init.normal_(bias, mean=0.3, std=0.5)
    return encoder


def small_vae(**overrides):
    """A small VAE of four blocks (eight times down), with ``overrides`` of its config."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(16, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=64,
        **{"latent_channels": 4, **overrides},
    )


def sd_scheduler():
    from diffusers import PNDMScheduler

    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )


def t5_tokenizer(max_length: int = 256):
    """A T5 tokenizer (SentencePiece-style unigram: ``▁`` marks a word's start, ``</s>`` ends the text)
    over printable characters, built offline with the tokenizers library."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = sorted(set(string.printable) - set(string.whitespace))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in chars] + [(f"▁{c}", -2.5) for c in chars]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=max_length,
    )


def t5_encoder(tokenizer, hidden: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=hidden,
        d_kv=hidden // 4,
        d_ff=2 * hidden,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return T5EncoderModel(config)

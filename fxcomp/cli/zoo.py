"""Small models of the families people bring, built from configs with random weights (nothing
is downloaded): Hugging Face transformers encoders, vision transformers, a speech encoder and
decoder language models, each with example inputs of the kind it takes; and timm models by
name. The sweeps, the benchmarks and ``fxcomp dump transformers:NAME`` use them.

Example::

    model, inputs = transformer("bert")          # inputs: {"input_ids": ..., "attention_mask": ...}
    result = fxcomp.compile(model, inputs, passes=[fxcomp.passes.quantize_dynamic()])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fxcomp.ir.errors import InputError

__all__ = ["TRANSFORMERS", "text_inputs", "timm_model", "transformer"]

_VOCAB = 500


def text_inputs(batch: int = 2, length: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids and an all-ones attention mask.

    Example::

        inputs = text_inputs(8, 128)
    """
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, _VOCAB, (batch, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones(batch, length, dtype=torch.long)}


def _pixels(batch: int = 2, size: int = 32) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(batch, 3, size, size, generator=torch.Generator())}


def _encoder(width: int = 64, layers: int = 2) -> dict[str, int]:
    return {
        "hidden_size": width,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "intermediate_size": 2 * width,
    }


def _bert() -> nn.Module:
    import transformers as t

    return t.BertModel(t.BertConfig(vocab_size=_VOCAB, **_encoder()))


def _distilbert() -> nn.Module:
    import transformers as t

    config = t.DistilBertConfig(vocab_size=_VOCAB, dim=64, n_layers=2, n_heads=4, hidden_dim=128)
    return t.DistilBertModel(config)


def _roberta() -> nn.Module:
    import transformers as t

    return t.RobertaModel(t.RobertaConfig(vocab_size=_VOCAB, **_encoder()))


def _albert() -> nn.Module:
    import transformers as t

    return t.AlbertModel(t.AlbertConfig(vocab_size=_VOCAB, embedding_size=32, **_encoder()))


def _vit() -> nn.Module:
    import transformers as t

    return t.ViTModel(t.ViTConfig(image_size=32, patch_size=8, **_encoder()))


def _clip_vision() -> nn.Module:
    import transformers as t

    return t.CLIPVisionModel(t.CLIPVisionConfig(image_size=32, patch_size=8, **_encoder()))


def _whisper_encoder() -> nn.Module:
    import transformers as t

    config = t.WhisperConfig(
        vocab_size=_VOCAB,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        num_mel_bins=16,
        max_source_positions=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=3,
    )
    return t.WhisperModel(config).get_encoder()


def _gpt2() -> nn.Module:
    import transformers as t

    config = t.GPT2Config(vocab_size=_VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    config.pad_token_id = config.bos_token_id = config.eos_token_id = 0
    return t.GPT2LMHeadModel(config)


def _llama() -> nn.Module:
    import transformers as t

    config = t.LlamaConfig(
        vocab_size=_VOCAB, num_key_value_heads=2, max_position_embeddings=64, **_encoder()
    )
    return t.LlamaForCausalLM(config)


_TEXT = lambda: text_inputs()  # noqa: E731
_CAUSAL = lambda: {**text_inputs(), "use_cache": False}  # noqa: E731
_ZOO: dict[str, tuple[Callable[[], nn.Module], Callable[[], dict[str, Any]]]] = {
    "bert": (_bert, _TEXT),
    "distilbert": (_distilbert, _TEXT),
    "roberta": (_roberta, _TEXT),
    "albert": (_albert, _TEXT),
    "vit": (_vit, _pixels),
    "clip_vision": (_clip_vision, _pixels),
    "whisper_encoder": (_whisper_encoder, lambda: {"input_features": torch.randn(2, 16, 64)}),
    "gpt2": (_gpt2, _CAUSAL),
    "llama": (_llama, _CAUSAL),
}
TRANSFORMERS = tuple(_ZOO)


def transformer(name: str, seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """A small Hugging Face model (``TRANSFORMERS``) in eval mode, seeded, and example inputs
    for it (a dict of keyword inputs).

    Example::

        model, inputs = transformer("llama")
    """
    if name not in _ZOO:
        raise InputError(f"no zoo model {name!r}", hint=f"choose {', '.join(TRANSFORMERS)}")
    build, inputs = _ZOO[name]
    torch.manual_seed(seed)
    return build().eval(), inputs()


def timm_model(name: str, seed: int = 0) -> nn.Module:
    """A timm model with random weights, in eval mode.

    Example::

        model = timm_model("mobilevit_xxs")
    """
    import timm

    torch.manual_seed(seed)
    try:
        return timm.create_model(name, pretrained=False).eval()
    except RuntimeError as err:
        raise InputError(f"timm has no model {name!r}: {err}") from err

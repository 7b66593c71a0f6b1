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

__all__ = [
    "TIMM",
    "TRANSFORMERS",
    "non_degenerate",
    "randomize_batchnorm",
    "text_inputs",
    "timm_model",
    "transformer",
]

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

    sides = {
        f"{side}_{key}": value
        for side in ("encoder", "decoder")
        for key, value in (("layers", 2), ("attention_heads", 4), ("ffn_dim", 128))
    }
    tokens = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")
    config = t.WhisperConfig(
        vocab_size=_VOCAB,
        d_model=64,
        num_mel_bins=16,
        max_source_positions=32,
        **sides,
        **{name: i for i, name in enumerate(tokens)},
    )
    return t.WhisperModel(config).get_encoder()


def _gpt2() -> nn.Module:
    import transformers as t

    tokens = dict.fromkeys(("pad_token_id", "bos_token_id", "eos_token_id"), 0)
    config = t.GPT2Config(
        vocab_size=_VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, use_cache=False, **tokens
    )
    return t.GPT2LMHeadModel(config)


def _llama() -> nn.Module:
    import transformers as t

    config = t.LlamaConfig(
        vocab_size=_VOCAB,
        num_key_value_heads=2,
        max_position_embeddings=64,
        use_cache=False,  # a plain forward returns logits alone; generate() still caches
        **_encoder(),
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


# one model of each timm family that builds under 30M parameters (83 of timm 1.0's 98), the
# smallest-named first
TIMM = (
    "halonet26t",
    "gernet_s",
    "cait_xxs24_224",
    "coat_tiny",
    "convit_tiny",
    "convmixer_768_32",
    "convnext_atto",
    "cpubone_nano",
    "crossvit_tiny_240",
    "csatv2",
    "cs3darknet_s",
    "cspnext_tiny",
    "davit_tiny",
    "deit_tiny_patch16_224",
    "densenet121",
    "dla34",
    "dpn68",
    "edgenext_small",
    "efficientformer_l1",
    "efficientformerv2_s0",
    "tinynet_a",
    "efficientvim_m1",
    "efficientvit_b0",
    "efficientvit_m0",
    "eva02_tiny_patch14_224",
    "fasternet_t0",
    "fastvit_s12",
    "focalnet_tiny_lrf",
    "gcvit_tiny",
    "ghostnet_050",
    "hardcorenas_a",
    "hgnet_tiny",
    "hiera_tiny_224",
    "sam2_hiera_tiny",
    "hrnet_w18_small",
    "iformer_s",
    "inception_next_atto",
    "inception_v3",
    "lcnetv2_small",
    "levit_128",
    "lowformer_b0",
    "mambaout_femto",
    "maxvit_pico_rw_256",
    "caformer_s18",
    "gmlp_s16_224",
    "tf_mobilenetv3_large_minimal_100",
    "mobilevit_xxs",
    "mvitv2_tiny",
    "nest_tiny",
    "nf_seresnet26",
    "pit_xs_224",
    "pvt_v2_b0",
    "rdnet_tiny",
    "regnety_040_sgn",
    "repghostnet_050",
    "repvit_m1",
    "res2net50d",
    "resnest14d",
    "resnet18",
    "resnetv2_18",
    "rexnet_100",
    "legacy_seresnet18",
    "sequencer2d_s",
    "shvit_s1",
    "skresnet18",
    "starnet_s1",
    "swiftformer_xs",
    "swin_s3_tiny_224",
    "swinv2_tiny_window8_256",
    "swinv2_cr_tiny_224",
    "tiny_vit_5m_224",
    "tnt_s_patch16_224",
    "twins_svt_small",
    "visformer_tiny",
    "vit_tiny_patch16_224",
    "vit_tiny_r_s16_p8_224",
    "vit_relpos_small_patch16_224",
    "vitamin_small_224",
    "volo_d1_224",
    "ese_vovnet19b_slim",
    "legacy_xception",
    "xception41",
    "xcit_nano_12_p8_224",
)


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics, so that folding changes the weights.

    Example::

        randomize_batchnorm(torchvision.models.resnet18())
    """
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.data.copy_(torch.rand(n, generator=gen) * 0.2 - 0.1)
    return model


def non_degenerate(model: nn.Module) -> nn.Module:
    """``model`` with its zero-initialised weight matrices (ViT heads, which would make
    every output 0) drawn at random and its BatchNorm statistics randomized: random
    weights that exercise folding and parity checks.

    Example::

        model = non_degenerate(torchvision.models.vit_b_16())
    """
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        if p.dim() >= 2 and not p.any():
            p.data.normal_(0, 0.02, generator=gen)
    return randomize_batchnorm(model)


def timm_model(name: str, seed: int = 0) -> nn.Module:
    """A timm model with random weights (``non_degenerate``), in eval mode.

    Example::

        model = timm_model("mobilevit_xxs")
    """
    import timm

    torch.manual_seed(seed)
    try:
        return non_degenerate(timm.create_model(name, pretrained=False)).eval()
    except RuntimeError as err:
        raise InputError(f"timm has no model {name!r}: {err}") from err

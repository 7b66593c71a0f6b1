"""fxcomp's Attention and the unpack_attention pass: the same function as
nn.MultiheadAttention (rtol 1e-5, atol 1e-6) in every supported case, projections as
Linear nodes in the graph, honest ``modified``, a second run that changes nothing, and
clear refusals."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fxcomp
from fxcomp import PassManager
from fxcomp.ir.errors import InputError, PassError, PassOrderError
from fxcomp.nn.attention import Attention, conversion_refusal
from fxcomp.passes import fuse, smooth_quant, unpack_attention

TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def _sdpa_nodes(gm):
    return gm.graph.find_nodes(op="call_function", target=F.scaled_dot_product_attention)


def _multihead_nodes(gm):
    return [
        n
        for n in gm.graph.find_nodes(op="call_module")
        if isinstance(gm.get_submodule(str(n.target)), nn.MultiheadAttention)
    ]


def _second_run_is_a_no_op(gm, inputs):
    _, records = PassManager([unpack_attention()]).run(
        gm, fxcomp.CompileContext.from_inputs(inputs)
    )
    return not records[0].modified


class Blocks(nn.Module):
    """Self-attention with a padding mask and a causal mask held as a buffer (weights
    returned, not read), causal self-attention by the ``is_causal`` hint, and
    cross-attention to keys and values of other widths (kdim/vdim)."""

    def __init__(self, batch_first: bool, bias: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.self_attn = nn.MultiheadAttention(16, 4, bias=bias, batch_first=batch_first)
        self.causal_attn = nn.MultiheadAttention(16, 2, bias=bias, batch_first=batch_first)
        self.cross = nn.MultiheadAttention(
            16, 4, kdim=12, vdim=10, bias=bias, batch_first=batch_first
        )
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(5))
        self.norm = nn.LayerNorm(16)

    def forward(self, x, keys, values, padding):
        y, _ = self.self_attn(x, x, x, key_padding_mask=padding, attn_mask=self.causal < 0)
        x = self.norm(x + y)
        y = self.causal_attn(x, x, x, attn_mask=self.causal, is_causal=True, need_weights=False)
        x = x + y[0]
        return x + self.cross(x, keys, values, need_weights=False)[0]


def _blocks_inputs(batch_first: bool):
    gen = torch.Generator().manual_seed(3)

    def seq(length, width):
        shape = (2, length, width) if batch_first else (length, 2, width)
        return torch.randn(shape, generator=gen)

    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[1, 3:] = True
    return seq(5, 16), seq(7, 12), seq(7, 10), padding


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_unpack_keeps_masks_layouts_and_cross_attention(batch_first, bias):
    torch.manual_seed(0)
    model = Blocks(batch_first, bias).eval()
    inputs = _blocks_inputs(batch_first)
    result = fxcomp.compile(model, inputs, passes=[unpack_attention()])
    gm = result.module
    # structure: no MultiheadAttention call left, one SDPA per layer, Linear projections
    assert not _multihead_nodes(gm) and len(_sdpa_nodes(gm)) == 3
    for name in ("self_attn", "causal_attn", "cross"):
        assert isinstance(gm.get_submodule(name), Attention)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            (node,) = gm.graph.find_nodes(op="call_module", target=f"{name}.{proj}")
            assert type(gm.get_submodule(str(node.target))) is nn.Linear
            assert node.meta["fxcomp_pass"] == "unpack_attention"
            assert (gm.get_submodule(f"{name}.{proj}").bias is not None) == bias
    assert gm.cross.k_proj.in_features == 12 and gm.cross.v_proj.in_features == 10
    rows = result.report.tables["unpack_attention"]
    assert [(r["layer"], r["kind"], r["masks"]) for r in rows] == [
        ("self_attn", "self", "key_padding_mask, attn_mask"),
        ("causal_attn", "self", "attn_mask, causal"),
        ("cross", "cross", "-"),
    ]
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), model(*inputs), **TOLERANCE)
    assert result.report.records[-1].modified and _second_run_is_a_no_op(gm, inputs)


def test_unpack_vit_is_exact_and_idempotent():
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128
    ).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    result = fxcomp.compile(vit, x, passes=[unpack_attention()])
    gm = result.module
    assert not _multihead_nodes(gm) and len(_sdpa_nodes(gm)) == 2
    ln = gm.graph.find_nodes(op="call_module", target="encoder.layers.encoder_layer_0.ln_1")[0]
    assert sorted(str(u.target).rsplit(".", 1)[1] for u in ln.users) == [
        "k_proj",
        "q_proj",
        "v_proj",
    ]  # the LayerNorm feeds the projections directly: what smooth_quant rescales
    # the getitem of each block's ``x, _ = self_attention(...)`` is gone with the call (the
    # unused ``_`` is dead code the capture already drops)
    traced = fxcomp.trace(vit, x)
    getitems = [
        len(g.graph.find_nodes(op="call_function", target=operator.getitem)) for g in (traced, gm)
    ]
    assert getitems[0] - getitems[1] == 2
    with torch.no_grad():
        torch.testing.assert_close(gm(x), vit(x), **TOLERANCE)
    assert _second_run_is_a_no_op(gm, (x,))
    # a model without attention: nothing to do, and it says so
    plain = fxcomp.compile(nn.Sequential(nn.Linear(4, 4)), torch.randn(1, 4), passes=[fuse()])
    _, records = PassManager([unpack_attention()]).run(
        plain.module, fxcomp.CompileContext.from_inputs((torch.randn(1, 4),))
    )
    assert not records[0].modified


def test_unpacked_graph_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    model = Blocks(batch_first=True).eval()
    inputs = _blocks_inputs(True)
    gm = fxcomp.compile(model, inputs, passes=[unpack_attention()]).module
    fxcomp.save(gm, tmp_path / "model.fxgraph")
    loaded = fxcomp.load(tmp_path / "model.fxgraph")
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs), gm(*inputs), rtol=0, atol=0)


class Shared(nn.Module):
    """One attention layer called twice (weights shared between the calls); its (None)
    weights and its whole output tuple are outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        y, weights = self.attn(x, x, x, need_weights=False)
        return self.attn(x + y, x + y, x + y, need_weights=False), weights


def test_a_layer_called_twice_becomes_one_attention():
    torch.manual_seed(0)
    model, x = Shared().eval(), torch.randn(2, 6, 8)
    gm = fxcomp.compile(model, x, passes=[unpack_attention()]).module
    assert len(gm.graph.find_nodes(op="call_module", target="attn.q_proj")) == 2
    assert sum(p.numel() for p in gm.parameters()) == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        (out, none), weights = gm(x)
        assert none is None and weights is None
        torch.testing.assert_close(out, model(x)[0][0], **TOLERANCE)


class SelfAttention(nn.Module):
    """``attn(x, x, x)``; with ``weights`` its attention weights are an output too."""

    def __init__(self, weights: bool = False, **options) -> None:
        super().__init__()
        self.weights = weights
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, **options)

    def forward(self, x):
        out, weights = self.attn(x, x, x, need_weights=self.weights)
        return (out, weights) if self.weights else out


def test_refusals_name_the_layer_and_the_reason():
    x = torch.randn(2, 6, 8)
    with pytest.raises(PassError, match="unpack_attention.*'attn'.*attention weights") as info:
        fxcomp.compile(SelfAttention(weights=True).eval(), x, passes=[unpack_attention()])
    assert "skip=['attn']" in str(info.value)
    # skipped: left as it is, and the report says why
    model = SelfAttention(weights=True).eval()
    result = fxcomp.compile(model, x, passes=[unpack_attention(skip=["attn"])])
    assert _multihead_nodes(result.module) and not result.report.records[-1].modified
    assert [n.reason for n in result.report.notes] == ["'attn' is in skip"]
    # a variant Attention does not compute: the rule does not apply, with the reason
    model = SelfAttention(add_bias_kv=True).eval()
    result = fxcomp.compile(model, x, passes=[unpack_attention()])
    assert _multihead_nodes(result.module) and not result.report.records[-1].modified
    assert "add_bias_kv=True" in result.report.notes[0].reason
    assert "add_zero_attn" in conversion_refusal(nn.MultiheadAttention(8, 2, add_zero_attn=True))
    with pytest.raises(InputError, match="add_bias_kv"):
        Attention.from_multihead(model.attn)
    with pytest.raises(InputError, match="need_weights=True"):
        Attention(8, 2)(x, x, x, need_weights=True)
    with pytest.raises(PassOrderError, match="'unpack_attention' must run before 'smooth_quant'"):
        fxcomp.compile(model, x, passes=[smooth_quant([x]), unpack_attention()])


def test_attention_has_free_head_widths_and_a_fixed_scale():
    attention = Attention(16, 4, qk_dim=6, v_dim=3, batch_first=True)
    assert attention.q_proj.out_features == 24 and attention.v_proj.out_features == 12
    assert attention.out_proj.in_features == 12 and attention.scale == pytest.approx(6**-0.5)
    x = torch.randn(2, 5, 16)
    out, weights = attention(x, x, x)
    assert out.shape == (2, 5, 16) and weights is None
    model = SelfAttention()
    model.attn = attention
    gm = fxcomp.trace(model, x)  # traced through: its projections are Linear nodes
    targets = {str(n.target) for n in gm.graph.find_nodes(op="call_module")}
    assert targets == {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"}
    torch.testing.assert_close(gm(x), out, rtol=0, atol=0)
    with pytest.raises(InputError, match="not divisible"):
        Attention(10, 4)

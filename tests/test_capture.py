"""Capture through torch.export: Hugging Face models compile end to end, lifted to modules.

Parity of a lifted graph with its model is exact (the same ops, reordered only where the
export's functional form is the same arithmetic): compared with ``rtol=0, atol=0``.
Quantized results are compared by cosine similarity to the float model's output.
"""

from __future__ import annotations

import copy

import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

import fxcomp
from fxcomp.cli.zoo import text_inputs, transformer
from fxcomp.ir.capture import CAPTURE
from fxcomp.passes import distill, fuse, prune, quantize, quantize_dynamic, smooth_quant
from fxcomp.pruning.plan import PruneOptions, pruning_plan, zero_channels
from tests.conftest import relative_error

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def bert():
    return transformer("bert")


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def test_bert_is_exported_lifted_to_its_modules_and_exact_at_other_sizes(bert):
    model, inputs = bert
    result = fxcomp.compile(model, inputs)
    gm, info = result.module, result.report.records[0].options
    assert info["capture"] == "export" and info["inputs"] == ["input_ids", "attention_mask"]
    assert info["reason"].startswith("symbolic tracing failed: cannot trace the model's own")
    assert info["static_axes"] == []
    layers = {str(n.target) for n in gm.graph.find_nodes(op="call_module")}
    assert "encoder.layer.1.attention.self.query" in layers and "embeddings.LayerNorm" in layers
    assert isinstance(gm.get_submodule("encoder.layer.1.intermediate.dense"), nn.Linear)
    aten = [n for n in gm.graph.nodes if "aten." in str(n.target)]
    assert not any(op in str(n.target) for n in aten for op in ("linear", "layer_norm", "embed"))
    for batch, length in ((2, 12), (3, 7), (1, 30)):
        sample = text_inputs(batch, length, seed=batch)
        with torch.no_grad():
            out = gm(*sample.values())
            expected = model(**sample)
        assert isinstance(out, BaseModelOutputWithPoolingAndCrossAttentions)
        torch.testing.assert_close(
            out.last_hidden_state, expected.last_hidden_state, rtol=0, atol=0
        )


def test_keyword_settings_become_constants_of_the_graph():
    model, inputs = transformer("gpt2")  # inputs carry use_cache=False
    result = fxcomp.compile(model, inputs)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        torch.testing.assert_close(result.module(ids, mask).logits, model(**inputs).logits)
    assert CAPTURE.get(result.module)["inputs"] == ["input_ids", "attention_mask"]
    linears = [n for n in result.module.graph.find_nodes(op="call_module")]
    assert {"transformer.h.0.attn.c_attn", "lm_head"} <= {str(n.target) for n in linears}


def test_bert_quantizes_dynamically_and_statically_and_runs_in_onnx_runtime(bert, tmp_path):
    model, inputs = bert
    sample = text_inputs(3, 9, seed=5)
    with torch.no_grad():
        expected = model(**sample).last_hidden_state
    dynamic = fxcomp.compile(model, inputs, passes=[quantize_dynamic()]).module
    with torch.no_grad():
        assert cosine(dynamic(*sample.values()).last_hidden_state, expected) > 0.999
    calibration = [tuple(text_inputs(4, 12, seed=s).values()) for s in range(3)]
    passes = [fuse(), smooth_quant(calibration), quantize(calibration, engine="ort")]
    result = fxcomp.compile(model, inputs, passes, backend="onnx", output_dir=tmp_path)
    assert result.artifact.parity["sqnr_db_vs_float"] > 25
    session = ort.InferenceSession(str(result.artifact.path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feeds = {n: v.numpy() for n, v in zip(names, sample.values(), strict=True)}
    hidden = torch.from_numpy(session.run(None, feeds)[0])
    assert hidden.shape == (3, 9, 64) and cosine(hidden, expected) > 0.99


def test_mixed_precision_keeps_residual_adds_float_to_reach_its_target(bert, tmp_path):
    """A Transformer's residual stream runs through its adds: on this BERT all INT8 is
    33.4 dB, and two adds in float (no Linear) reach 35, in ONNX Runtime too."""
    model, inputs = bert
    calibration = [tuple(v for v in inputs.values() if isinstance(v, torch.Tensor))] * 2
    step = quantize(calibration, engine="ort", target_sqnr=35.0, progress=False)
    result = fxcomp.compile(model, inputs, [fuse(), step], backend="onnx", output_dir=tmp_path)
    rows = result.report.tables["mixed_precision"]
    assert float(rows[0]["sqnr_db"]) < 35 <= float(rows[-1]["sqnr_db"])
    chosen = rows[-1]["float layers and ops"].split(", ")
    graph_adds = {n.name for n in result.module.graph.nodes if n.name.startswith("add")}
    assert 0 < len(chosen) < len(graph_adds) and set(chosen) <= graph_adds
    assert rows[-1]["extra_weight_bytes"] == 0
    assert result.artifact.parity["sqnr_db_vs_float"] >= 35  # ONNX Runtime's run of the file


def test_bert_prunes_within_its_heads_exactly(bert):
    model, inputs = bert
    base = fxcomp.trace(model, inputs)
    plan = pruning_plan(base, PruneOptions(0.5))
    zeroed = copy.deepcopy(base)
    zero_channels(zeroed, plan)
    result = fxcomp.compile(model, inputs, passes=[prune(0.5)])
    sample = text_inputs(2, 12)
    with torch.no_grad():
        pruned = result.module(*sample.values()).last_hidden_state
        assert relative_error(pruned, zeroed(*sample.values()).last_hidden_state) < 1e-5
        assert result.module(*text_inputs(3, 5).values()).last_hidden_state.shape == (3, 5, 64)
    query = result.module.get_submodule("encoder.layer.0.attention.self.query")
    value = result.module.get_submodule("encoder.layer.0.attention.self.value")
    assert query.out_features == value.out_features == 32  # 4 heads of 8, were 16
    assert result.module.get_submodule("encoder.layer.0.intermediate.dense").out_features == 64


def test_distil_a_pruned_classifier_from_the_hugging_face_model():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, num_labels=3,
    )  # fmt: skip
    teacher = BertForSequenceClassification(config).eval()
    with torch.no_grad():  # logits far enough apart for pruning to move them (random weights)
        teacher.classifier.weight.mul_(30)
    inputs = text_inputs(4, 12)
    data = [(*text_inputs(8, 12, seed=s).values(), torch.randint(0, 3, (8,))) for s in range(8)]
    student = distill(teacher, data, epochs=4, lr=1e-3, alpha=1.0, temperature=1.0, progress=False)
    pruned = fxcomp.compile(teacher, inputs, passes=[prune(0.5)]).module
    result = fxcomp.compile(teacher, inputs, passes=[prune(0.5), student])
    assert result.report.find("distill").modified
    held_out = text_inputs(16, 12, seed=99)
    with torch.no_grad():
        wanted = teacher(**held_out).logits
        before = F.mse_loss(pruned(*held_out.values()).logits, wanted)
        after = F.mse_loss(result.module(*held_out.values()).logits, wanted)
    assert after < 0.7 * before  # measured: 0.064 -> 0.026, towards the teacher it was pruned from


def test_bad_capture_requests_are_clear_errors(bert):
    model, inputs = bert
    with pytest.raises(fxcomp.InputError, match="'token_ids' is not a parameter of BertModel"):
        fxcomp.trace(model, {"token_ids": inputs["input_ids"]})
    with pytest.raises(fxcomp.InputError, match="dynamic_shapes is torch.export's option"):
        fxcomp.trace(model, inputs, capture="symbolic", dynamic_shapes={})
    fixed_length = {"input_ids": {0: Dim("batch"), 1: 5}, "attention_mask": None}
    with pytest.raises(fxcomp.TraceError, match="torch.export cannot capture the model"):
        fxcomp.trace(model, inputs, capture="export", dynamic_shapes=fixed_length)


def test_an_export_with_a_data_dependent_shape_names_the_line():
    class Nonzero(nn.Module):
        def forward(self, x):
            return x[x > 0].sum().reshape(1) + torch.zeros(int((x > 0).sum()))

    with pytest.raises(fxcomp.TraceError) as info:
        fxcomp.trace(Nonzero(), torch.randn(4), capture="export")
    assert "test_capture.py:" in str(info.value) and "torch.zeros(int((x > 0).sum()))" in str(
        info.value
    )


def test_dynamic_int8_goes_to_onnx_runtime_as_matmul_integer(bert, tmp_path):
    import onnx

    model, inputs = bert
    passes = [quantize_dynamic(engine="ort")]
    result = fxcomp.compile(model, inputs, passes, backend="onnx", output_dir=tmp_path)
    ops = [n.op_type for n in onnx.load(result.artifact.path).graph.node]
    assert ops.count("MatMulInteger") == ops.count("DynamicQuantizeLinear") == 13
    assert len(result.artifact.manifest["int8_layers"]["int8"]) == 13
    assert result.artifact.parity["sqnr_db_vs_reference"] > 100  # ORT computes what it means
    session = fxcomp.backends.BACKENDS["onnx"].load(result.artifact.path)
    sample = text_inputs(3, 9, seed=3)
    hidden = fxcomp.backends.onnx.backend.run(session, tuple(sample.values()))
    with torch.no_grad():
        assert cosine(hidden, model(**sample).last_hidden_state) > 0.999
    recurrent = nn.Sequential(nn.LSTM(4, 4))
    with pytest.raises(fxcomp.PassError, match="'0' is a LSTM: quantize_dynamic\\(engine='ort'\\)"):
        fxcomp.compile(recurrent, torch.randn(2, 1, 4), passes=[quantize_dynamic(engine="ort")])

"""The language model trained on Python's standard library, and weight-only quantization of
it measured in held-out perplexity (per byte): int8 within 1% of float, int4 g128 with
GPTQ and AWQ within 5%, and GPTQ better than rounding.

Training happens once per machine (about two minutes on two cores) and is cached.
"""

from __future__ import annotations

import pytest

import fxcomp
from fxcomp.cli.stdlib_lm import perplexity, stdlib_corpus, stdlib_lm, text_batches
from fxcomp.passes import quantize_weights


def test_corpus_splits_by_file_into_unseen_text():
    corpus = stdlib_corpus()
    assert len(corpus.train) > 8 * len(corpus.held_out) > 10**6
    text = bytes(corpus.held_out[:20000].tolist()).decode("utf-8", "replace")
    assert "def " in text and '"""' in text  # code and its docstrings


@pytest.mark.slow
def test_weight_only_perplexity_on_held_out_text():
    corpus = stdlib_corpus()
    model = stdlib_lm(progress=False)
    ids = {"input_ids": text_batches(corpus.train, batches=1, batch=1)[0]}
    data = [(b,) for b in text_batches(corpus.train, batches=16, batch=8, seed=7)]
    base = perplexity(model, corpus.held_out)
    # a model that learned the text: a uniform guess is 256, byte frequencies alone about 25
    assert base < 12

    def quantized(**options):
        passes = [quantize_weights(data=data, progress=False, **options)]
        return perplexity(fxcomp.compile(model, ids, passes=passes).module, corpus.held_out)

    assert quantized(bits=8) < 1.01 * base
    nearest = quantized(bits=4, group_size=128)
    searched = {m: quantized(bits=4, group_size=128, method=m) for m in ("gptq", "awq")}
    assert max(searched.values()) < 1.05 * base, (searched, base)
    # GPTQ beats rounding to nearest; AWQ's per-layer gains (6-12% lower output error) do
    # not always carry to perplexity on this small model, whose RTN is already within 0.1%
    assert searched["gptq"] < nearest, (searched, nearest, base)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [8, 4])
def test_weight_only_pte_keeps_the_trained_models_perplexity(bits, tmp_path):
    """The ExecuTorch program of the trained model: its Linears quantize their inputs to
    int8 per row, which the reference graph does not, so it is held to the graph it was
    lowered from; its perplexity on held-out text stays within 0.5% of float."""
    corpus = stdlib_corpus()
    model = stdlib_lm(progress=False)
    ids = {"input_ids": text_batches(corpus.train, batches=1, batch=2, length=64)[0]}
    step = quantize_weights(bits=bits, group_size=32, symmetric=True, progress=False)
    options = {"max_batch": 8, "max_length": 256}
    result = fxcomp.compile(model, ids, [step], "executorch", tmp_path, backend_options=options)
    parity = result.artifact.parity
    if bits == 8:  # held to the graph it was lowered from, which quantizes the Linears'
        # inputs too: int8 weights alone are about 57 dB from float, with the inputs 49 dB
        assert parity["sqnr_db_reference_vs_float"] < 54
    assert parity["sqnr_db_vs_reference"] > parity["sqnr_db_reference_vs_float"]
    program = fxcomp.load_bundle(result.artifact.path).module
    base = perplexity(model, corpus.held_out, windows=16)
    through_pte = perplexity(lambda x: (program(x),), corpus.held_out, windows=16)
    assert abs(through_pte / base - 1) < 0.005, (through_pte, base)

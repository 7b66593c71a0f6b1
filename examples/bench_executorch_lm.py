"""A decoder language model as ExecuTorch ``.pte`` programs for XNNPACK: fxcomp's weight-only
int8 and int4 against torchao's int8-dynamic-activation int4-weight ("8da4w", the
quantization ExecuTorch's own LLM export uses).

    python examples/bench_executorch_lm.py
    python examples/bench_executorch_lm.py --prompt 64 --max-length 128 --repeats 120

A Llama of about 58M parameters (8 layers, 512 wide, 32000-token vocabulary; random
weights, seed 0). Programs, each lowered for batch 1 with the sequence axis dynamic up to
``--max-length`` tokens, every Linear (the head included) in XNNPACK:

* float: ``fxcomp.compile(model, inputs, [], "executorch")``;
* fxcomp int8: ``quantize_weights(bits=8, lm_head=True)``: int8 weights per channel,
  XNNPACK's dynamically quantized linear (inputs quantized to int8 per row at run time);
* fxcomp int4: ``quantize_weights(bits=4, group_size=32, symmetric=True, lm_head=True)``:
  XNNPACK's groupwise int4 linear, inputs as above;
* torchao 8da4w (the peer): ``quantize_(model, Int8DynamicActivationIntxWeightConfig(
  weight_dtype=torch.int4, weight_granularity=PerGroup(32)))``, exported and lowered the same
  way.

Measured: the latency of one forward pass over a ``--prompt``-token prompt (the prefill of a
generation; ExecuTorch has no key/value-cache loop here, so decoding is not timed), each
program in ExecuTorch's runtime, warmed up ``--warmup`` times, then interleaved for
``--repeats`` rounds, every order in turn, with fxcomp int4 under a second name (A/A); the
``.pte`` size; and the SQNR of the last position's logits against the float model's over
``--prompts`` random prompts (random weights make int4 far noisier than on a trained model:
the figure compares the two int4 programs, it is not a quality figure).

Quality: the same four recipes on the small Llama trained on Python's standard library
(``fxcomp.cli.stdlib_lm``, 3.5M parameters, trained once and cached), each lowered with
batches of up to 8 windows of up to 256 bytes, and its perplexity per byte on held-out
standard-library files computed from the ``.pte`` program's logits in ExecuTorch's runtime,
beside the float model's and each fxcomp reference graph's. ``--json PATH`` writes every
number.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import warnings
from pathlib import Path

import torch
import transformers
from benchmarks_doc import add_output_options, output
from torch import nn

import fxcomp
from fxcomp.backends.executorch.program import ExecuTorchProgram, lower, require_executorch
from fxcomp.cli.stdlib_lm import perplexity, stdlib_corpus, stdlib_lm
from fxcomp.passes import quantize_weights
from fxcomp.runtime.latency import median_latency
from fxcomp.runtime.parity import sqnr

WINDOW = 256  # bytes per perplexity window
CONFIG = {
    "vocab_size": 32000,
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "max_position_embeddings": 512,
}


class _Logits(nn.Module):
    """A causal LM called on token ids alone, its logits out (for ``lower``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def _peer(model: nn.Module, ids: torch.Tensor, max_length: int, max_batch: int = 1) -> bytes:
    """torchao's 8da4w, group 32, on every Linear, lowered for XNNPACK."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    peer = copy.deepcopy(model)
    config = Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int4, weight_granularity=PerGroup(32)
    )
    quantize_(peer, config)
    return lower(_Logits(peer), (ids,), max_batch=max_batch, max_length=max_length).program


def _recipes() -> dict[str, list]:
    """fxcomp's passes for each of its programs."""
    return {
        "float": [],
        "fxcomp int8": [quantize_weights(bits=8, lm_head=True, progress=False)],
        "fxcomp int4": [
            quantize_weights(bits=4, group_size=32, symmetric=True, lm_head=True, progress=False)
        ],
    }


def programs(
    model: nn.Module, ids: torch.Tensor, max_batch: int, max_length: int, work: Path
) -> tuple[dict, dict]:
    """Every program, loaded in ExecuTorch's runtime, and its ``.pte`` size, by name; and
    fxcomp's reference graphs."""
    inputs = {"input_ids": ids, "use_cache": False}
    options = {"max_batch": max_batch, "max_length": max_length}
    runs, sizes, graphs = {}, {}, {}
    for name, passes in _recipes().items():
        print(f"lowering {name}", flush=True)
        out = work / name.replace(" ", "-")
        result = fxcomp.compile(model, inputs, passes, "executorch", out, backend_options=options)
        runs[name] = fxcomp.load_bundle(result.artifact.path).module
        sizes[name] = result.artifact.manifest["members"]["model.pte"]["bytes"]
        graphs[name] = result.module
    print("lowering torchao 8da4w", flush=True)
    peer = _peer(model, ids, max_length, max_batch)
    runs["torchao 8da4w"], sizes["torchao 8da4w"] = ExecuTorchProgram(peer), len(peer)
    return runs, sizes, graphs


def measure(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, CONFIG["vocab_size"], (1, args.prompt), generator=gen)
    prompts = [
        torch.randint(0, CONFIG["vocab_size"], (1, args.prompt), generator=gen)
        for _ in range(args.prompts)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        runs, sizes, _ = programs(model, ids, 1, args.max_length, Path(tmp))
    with torch.no_grad():
        reference = torch.cat([model(input_ids=p, use_cache=False).logits[:, -1] for p in prompts])
    figures = {
        name: sqnr(reference, torch.cat([run(p)[:, -1] for p in prompts]))
        for name, run in runs.items()
    }
    for run in runs.values():
        for _ in range(args.warmup):
            run(ids)
    runs["fxcomp int4 (A/A)"] = runs["fxcomp int4"]
    ms = {key: v[0] for key, v in median_latency(runs, [(ids,)], args.repeats).items()}
    print(", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()))
    return {
        "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "latency_ms": ms,
        "size_mib": {k: v / 2**20 for k, v in sizes.items()},
        "sqnr_db": figures,
    }


def measure_perplexity() -> dict:
    """Perplexity per byte on held-out text: the float model, and each program's and each
    reference graph's."""
    model, held_out = stdlib_lm(), stdlib_corpus().held_out
    windows = torch.zeros(8, WINDOW, dtype=torch.long)
    with tempfile.TemporaryDirectory() as tmp:
        runs, _, graphs = programs(model, windows, 8, WINDOW, Path(tmp))
    figures = {"float": {"pte": None, "graph": perplexity(model, held_out, length=WINDOW)}}
    for name, run in runs.items():
        graph = graphs.get(name)
        figures[name] = {
            "pte": perplexity(lambda x, run=run: (run(x),), held_out, length=WINDOW),
            "graph": perplexity(graph, held_out, length=WINDOW) if graph is not None else None,
        }
    print(f"perplexity: {figures}")
    return figures


def tables_of(result: dict, args: argparse.Namespace) -> list:
    ms, sizes, figures = result["latency_ms"], result["size_mib"], result["sqnr_db"]
    rows = [
        [
            name,
            f"{sizes[name.removesuffix(' (A/A)')]:.1f}",
            f"{ms[name]:.2f}",
            f"{ms[name] / ms['float']:.3f}",
            f"{figures[name]:.2f}" if name in figures else "",
        ]
        for name in ms
    ]
    headers = [
        f"Llama {result['parameters_m']:.0f}M, .pte",
        "MiB",
        f"ms, {args.prompt}-token prompt",
        "/ float",
        "SQNR dB vs float, last logits",
    ]
    int4 = ms["fxcomp int4"] / ms["torchao 8da4w"]
    rows.append(["fxcomp int4 / torchao 8da4w", "", f"{int4:.3f}", "", ""])
    tables = [(rows, headers)]
    if result["perplexity"] is not None:
        figures = result["perplexity"]
        base = figures["float"]["graph"]
        quality = [
            [
                name,
                f"{f['graph']:.4f}" if f["graph"] is not None else "",
                f"{f['pte']:.4f}" if f["pte"] is not None else "",
                f"{((f['pte'] or f['graph']) / base - 1) * 100:+.2f}%",
            ]
            for name, f in figures.items()
        ]
        headers = ["stdlib LM", "perplexity, graph", "perplexity, .pte", ".pte vs float"]
        tables.append((quality, headers))
    return tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=64, help="tokens in the timed prompt")
    parser.add_argument("--max-length", type=int, default=128, help="the programs' longest input")
    parser.add_argument("--prompts", type=int, default=8, help="prompts the SQNR is taken over")
    parser.add_argument("--repeats", type=int, default=120, help="timed rounds: every order once")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs of each program")
    parser.add_argument(
        "--perplexity",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the stdlib LM's perplexity through each program",
    )
    add_output_options(parser)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    require_executorch()
    result = measure(args)
    result["perplexity"] = measure_perplexity() if args.perplexity else None
    output("bench_executorch_lm", args, tables_of(result, args), result)


if __name__ == "__main__":
    main()

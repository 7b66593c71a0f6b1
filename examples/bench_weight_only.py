"""Weight-only INT8 and INT4 on Llama-architecture language models: perplexity on real
text, and tokens per second decoding at batch 1.

    python examples/bench_weight_only.py [--rounds 5] [--new-tokens 128] [--skip-speed]

Perplexity: the small Llama trained on Python's standard library (``fxcomp.cli.stdlib_lm``,
trained once and cached), on held-out files it never saw, per byte: float, int8 RTN, and
int4 RTN, GPTQ and AWQ at group sizes 32, 128 and 256, each with its calibration time
(16 batches of 8 x 128 bytes of training text).

Speed: a Llama config of about 200M parameters with random weights, ``generate`` of
``--new-tokens`` tokens after a 64-token prompt, greedy, batch 1, with its key/value cache:
float32, bfloat16, fxcomp int8 and int4 (g128) through ``quantize_weights`` and
``transplant`` (the Linears only; and with ``lm_head=True, embeddings=True``, "all"), on
the float32 model and on its bfloat16 copy, and torchao's ``Int8WeightOnlyConfig`` and its
CPU int4 configuration (``PrototypeInt4WeightOnlyConfig``, group 128, the same int4
kernel; both take every Linear, the head included) on the same two models as the peer.
One process, interleaved, the orders of the models shuffled round by round, medians, an
A/A line (fxcomp int4 under two names).
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
from benchmarks_doc import add_output_options, output, table

import fxcomp
from fxcomp.cli.stdlib_lm import perplexity, stdlib_corpus, stdlib_lm, text_batches
from fxcomp.passes import quantize_weights
from fxcomp.runtime.latency import describe_cpu, median_latency

SPEED_CONFIG = {
    "vocab_size": 32000,
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 12,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "max_position_embeddings": 512,
}


def quality_rows() -> list[dict[str, object]]:
    """Perplexity of every configuration on the held-out standard library."""
    corpus = stdlib_corpus()
    model = stdlib_lm()
    ids = text_batches(corpus.train, batches=1, batch=1, length=128)[0]
    data = [(b,) for b in text_batches(corpus.train, batches=16, batch=8, length=128, seed=7)]
    base = perplexity(model, corpus.held_out)
    rows = [
        {
            "weights": "float32",
            "method": "",
            "group": "",
            "perplexity": f"{base:.4f}",
            "vs float": "",
            "calibration s": "",
        }
    ]
    settings = [(8, "rtn", None, False)]
    settings += [(4, m, g, False) for g in (32, 128, 256) for m in ("rtn", "gptq", "awq")]
    settings += [(8, "rtn", None, True), (4, "rtn", 128, True), (4, "gptq", 128, True)]
    for bits, method, group, everything in settings:
        start = time.perf_counter()
        step = quantize_weights(
            bits=bits,
            group_size=group or 128,
            method=method,
            data=data,
            lm_head=everything,
            embeddings=everything,
            progress=False,
        )
        result = fxcomp.compile(model, {"input_ids": ids}, passes=[step])
        seconds = time.perf_counter() - start
        value = perplexity(result.module, corpus.held_out)
        rows.append(
            {
                "weights": f"int{bits}" + (", head and embeddings too" if everything else ""),
                "method": method,
                "group": group or "channel",
                "perplexity": f"{value:.4f}",
                "vs float": f"{100 * (value / base - 1):+.2f}%",
                "calibration s": f"{seconds:.1f}",
            }
        )
        print(rows[-1], flush=True)
    return rows


def _bytes(tensor: torch.Tensor) -> int:
    data = tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor
    if type(data) is not torch.Tensor and hasattr(data, "__tensor_flatten__"):  # torchao's
        names, _ = data.__tensor_flatten__()
        return sum(_bytes(getattr(data, name)) for name in names)
    return data.numel() * data.element_size()


def _weight_bytes(model: torch.nn.Module) -> int:
    """The bytes a model's weights are stored in (saved form, not what is resident)."""
    total = 0
    for module in model.modules():
        if hasattr(module, "storage_bytes"):
            total += module.storage_bytes()
            continue
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        total += sum(_bytes(t) for t in tensors)
    return total


def speed_models() -> dict[str, torch.nn.Module]:
    """The ~200M Llama in each weight format."""
    import transformers
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SPEED_CONFIG)).eval()
    example = {"input_ids": torch.randint(0, 32000, (1, 64)), "use_cache": False}
    half = copy.deepcopy(model).to(torch.bfloat16)
    models = {"float32": model, "bfloat16": half}

    def fxcomp_int(base: torch.nn.Module, bits: int, everything: bool) -> torch.nn.Module:
        step = quantize_weights(
            bits=bits, group_size=128, lm_head=everything, embeddings=everything, progress=False
        )
        result = fxcomp.compile(base, example, passes=[step])
        return fxcomp.transplant(base, result.module, example)

    def torchao_int(base: torch.nn.Module, bits: int) -> torch.nn.Module:
        peer = copy.deepcopy(base)
        config = Int8WeightOnlyConfig() if bits == 8 else PrototypeInt4WeightOnlyConfig(128)
        quantize_(peer, config)  # PrototypeInt4WeightOnlyConfig: its CPU int4
        return peer

    for bits in (8, 4):
        models[f"fxcomp int{bits}"] = fxcomp_int(model, bits, everything=False)
        models[f"fxcomp int{bits} all"] = fxcomp_int(model, bits, everything=True)
        models[f"torchao int{bits}"] = torchao_int(model, bits)
        models[f"fxcomp int{bits} all, bfloat16"] = fxcomp_int(half, bits, everything=True)
        models[f"torchao int{bits}, bfloat16"] = torchao_int(half, bits)
    models["fxcomp int4 (A/A)"] = models["fxcomp int4"]
    return models


def speed_rows(rounds: int, new_tokens: int) -> list[dict[str, object]]:
    models = speed_models()
    prompt = torch.randint(0, 32000, (1, 64), generator=torch.Generator().manual_seed(1))
    settings = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}

    def decoder(model: torch.nn.Module):
        def run(ids: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return model.generate(ids, **settings)

        return run

    outputs = {name: decoder(m)(prompt) for name, m in models.items()}
    ms = median_latency({name: decoder(m) for name, m in models.items()}, [(prompt,)], rounds)
    base = ms["float32"][0]
    rows = []
    for name, (value,) in ms.items():
        same = float((outputs[name] == outputs["float32"]).float()[0, 64:].mean())
        rows.append(
            {
                "model": name,
                "weight MiB": f"{_weight_bytes(models[name]) / 2**20:.0f}",
                "tokens/s": f"{new_tokens / (value / 1000):.1f}",
                "vs float32": f"{base / value:.2f}x",
                "tokens as float32's": f"{100 * same:.0f}%",
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--skip-speed", action="store_true")
    add_output_options(parser)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    quality = quality_rows()
    tables, results = [table(quality)], {"perplexity": quality}
    if not args.skip_speed:
        speed = speed_rows(args.rounds, args.new_tokens)
        tables.append(table(speed))
        results["speed"] = speed
    print(describe_cpu())
    output("bench_weight_only", args, tables, results)


if __name__ == "__main__":
    main()

"""A small causal language model trained on real text that ships with Python: the standard
library's own sources, English docstrings and comments beside code.

The corpus is every ``.py`` file of the standard library outside its tests, read as bytes:
the tokenizer is the byte itself (256 ids, no vocabulary to ship). A file whose path
hashes into the last tenth is held out, so held-out perplexity is measured on files the
model never saw. The model is a Llama-architecture causal LM from transformers (4 layers,
256 wide, 3.5M parameters); training (400 steps of 16 x 128 bytes) takes about two
minutes on two cores, and its weights are cached in
safetensors under ``~/.cache/fxcomp`` (loaded without unpickling anything).

Example::

    model = stdlib_lm()                      # trains once, then loads from the cache
    print(perplexity(model, stdlib_corpus().held_out))
"""

from __future__ import annotations

import hashlib
import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fxcomp.cli.weights_cache import cached_training

__all__ = ["CONFIG", "Corpus", "perplexity", "stdlib_corpus", "stdlib_lm", "text_batches"]

CONFIG = {
    "vocab_size": 256,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}
_SKIPPED = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
_TRAINING = {"steps": 400, "batch": 16, "length": 128, "lr": 3e-3, "seed": 0}


@dataclass(frozen=True)
class Corpus:
    """The standard library as byte tensors: training text and held-out text."""

    train: torch.Tensor
    held_out: torch.Tensor


def stdlib_corpus() -> Corpus:
    """The standard library's sources (tests aside), split by file into training (nine
    tenths) and held-out text.

    Example::

        corpus = stdlib_corpus()   # corpus.train: uint8, about 20 MB
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: dict[bool, list[bytes]] = {True: [], False: []}
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if _SKIPPED & set(relative.parts):
            continue
        held_out = hashlib.sha1(str(relative).encode()).digest()[0] < 26  # about a tenth
        parts[held_out].append(path.read_bytes())
    as_tensor = lambda texts: torch.frombuffer(bytearray(b"\n".join(texts)), dtype=torch.uint8)  # noqa: E731
    return Corpus(as_tensor(parts[False]), as_tensor(parts[True]))


def text_batches(
    text: torch.Tensor, *, batches: int, batch: int = 8, length: int = 128, seed: int = 0
) -> list[torch.Tensor]:
    """``batches`` batches of ``batch`` windows of ``length`` bytes drawn from ``text``, as
    token ids (int64): calibration data for a pass.

    Example::

        data = text_batches(stdlib_corpus().train, batches=8)
    """
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(text) - length, (batches, batch), generator=generator)
    offsets = torch.arange(length)
    return [text[(row[:, None] + offsets)].long() for row in starts]


def _build() -> nn.Module:
    import transformers

    # use_cache=False: a plain forward returns the logits alone, what a capture takes;
    # generate() still decodes with its key/value cache
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG, use_cache=False))


def stdlib_lm(*, progress: bool = True) -> nn.Module:
    """The Llama-architecture model trained on the standard library, in eval mode: loaded
    from the cache, or trained (about two minutes on two cores) and cached.

    Example::

        model = stdlib_lm()
        logits = model(input_ids=ids).logits
    """
    import transformers

    key = repr((CONFIG, _TRAINING, torch.__version__.split("+")[0], transformers.__version__))
    return cached_training(
        _build(), "stdlib_lm", key, lambda m: _train(m, stdlib_corpus().train, progress=progress)
    )


def _train(model: nn.Module, text: torch.Tensor, *, progress: bool) -> None:
    settings = _TRAINING
    torch.manual_seed(settings["seed"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=0.01)
    steps = settings["steps"]
    warmup = steps // 20
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)),
    )
    data = text_batches(
        text, batches=steps, batch=settings["batch"], length=settings["length"] + 1, seed=1
    )
    model.train()
    bar = tqdm(data, desc="train stdlib LM", unit="step", disable=not progress or None)
    for window in bar:
        logits = model(input_ids=window[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, CONFIG["vocab_size"]), window[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


def perplexity(model: Any, text: torch.Tensor, *, length: int = 256, windows: int = 64) -> float:
    """Perplexity per byte of ``model`` (a causal LM, or a compiled module taking
    ``input_ids`` and returning logits first) on ``windows`` consecutive windows of
    ``length`` bytes of ``text``.

    Example::

        perplexity(model, stdlib_corpus().held_out)
    """
    usable = min(windows, (len(text) - 1) // length)
    ids = text[: usable * length + 1].long()
    inputs, targets = ids[:-1].reshape(usable, length), ids[1:].reshape(usable, length)
    total = 0.0
    with torch.no_grad():
        for i in range(0, usable, 8):
            output = model(inputs[i : i + 8])
            logits = output.logits if hasattr(output, "logits") else output[0]
            total += float(
                F.cross_entropy(
                    logits.reshape(-1, CONFIG["vocab_size"]).float(),
                    targets[i : i + 8].reshape(-1),
                    reduction="sum",
                )
            )
    return math.exp(total / targets.numel())

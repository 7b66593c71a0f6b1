"""Linear layers whose weight is stored in 8 or 4 bits and computed with the CPU's
weight-only kernels: ``WeightOnlyLinear``; and embedding tables stored the same way,
``WeightOnlyEmbedding``, which dequantize only the rows they look up.

8 bits: int8 codes per output channel, symmetric (``w = q * scale``), computed with
``torch._weight_int8pack_mm``. 4 bits: codes 0..15 in groups of ``group_size`` input
channels, asymmetric (``w = q * scale + minimum``), computed with
``aten._weight_int4pack_mm_for_cpu`` on that kernel's packed layout. Activations stay in
floating point. The kernels are made for a few rows at a time (decoding: one token per
sequence), where reading the weight is the cost, and for 16-bit activations: a float32
input is rounded to bfloat16 for them (and their result cast back), which makes them about
three times faster than with float32. Their time grows with the rows while dequantizing
the weight costs the same for any number of rows: on an AMD EPYC (Zen 4) they beat
dequantizing and the float matmul up to about 256 rows (a prompt), and lose beyond (a
calibration batch). So with more rows than ``KERNEL_ROWS`` the layer dequantizes its
weight and runs the float matmul. Where a shape does not fit the int4 kernel (its output
width must be a multiple of 16) it always dequantizes: ``kernel`` says which.

The int4 kernel's packed layout is the CPU build's own. The layer keeps the codes in a
portable form too (two per byte, the even input channel in the low nibble): that is what
the state dict holds and what dequantizing reads, and loading packs it for the CPU at hand.
An int4 layer so holds one byte per weight in memory, and reads half a byte per weight
when it decodes.

An optional ``input_scale`` multiplies the input first: an AWQ scale that could not be
folded into the op before the layer.

Example::

    layer = WeightOnlyLinear.from_codes(nn.Linear(256, 64), codes, scale, minimum, bits=4,
                                        group_size=128)
    y = layer(torch.randn(3, 256))
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["GROUP_SIZES", "KERNEL_ROWS", "WeightOnlyEmbedding", "WeightOnlyLinear", "dequantize"]

aten = torch.ops.aten

GROUP_SIZES = (32, 64, 128, 256)  # the group sizes the int4 kernel takes
KERNEL_ROWS = 256  # above this many input rows, dequantize and run the float matmul
_INT4_BLOCK = 16  # the int4 kernel packs output channels in blocks of 16


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """The float weight ``codes`` stand for: ``codes * scale (+ minimum)``, with ``scale`` and
    ``minimum`` given per group of ``group_size`` input channels (..., in / group_size).

    Example::

        w = dequantize(codes, scale, None, codes.shape[1])   # int8 per output channel
    """
    grouped = codes.reshape(*scale.shape, group_size).float()  # broadcast, never expanded
    if minimum is None:
        return (grouped * scale[..., None]).flatten(-2)
    return torch.addcmul(minimum[..., None], grouped, scale[..., None]).flatten(-2)


def _nibbles(packed: torch.Tensor, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """Two codes per byte, the even one in the low nibble, as ``dtype`` (..., 2 * bytes)."""
    codes = torch.empty(*packed.shape[:-1], 2 * packed.shape[-1], dtype=dtype)
    codes[..., 0::2] = packed & 15
    codes[..., 1::2] = packed >> 4
    return codes


def _store(
    module: nn.Module, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None
) -> None:
    """Put ``codes`` (int8, or 0..15 two per byte, the even column in the low nibble) and
    their grid into ``module``'s ``weight``, ``scale`` and ``minimum``."""
    module.scale.copy_(scale.reshape(module.scale.shape))
    if module.bits == 8:
        module.weight.copy_(codes)
    else:
        module.minimum.copy_(minimum)
        module.weight.copy_(codes[:, ::2] | (codes[:, 1::2] << 4))


class WeightOnlyLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` in int8 per output channel or int4 per group.

    Example::

        WeightOnlyLinear(256, 64, bits=8)(torch.randn(2, 256))   # zero weight until loaded
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int = 8,
        group_size: int | None = None,
        bias: bool = True,
        input_scale: bool = False,
    ) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 8 or 4, not {bits}")
        group_size = in_features if bits == 8 else group_size
        if group_size is None or in_features % group_size:
            raise ValueError(f"group size {group_size} does not divide {in_features} inputs")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        groups = in_features // group_size
        self.register_buffer("scale", torch.ones(out_features, groups))
        if bits == 8:
            self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.minimum = None
        else:
            self.register_buffer("minimum", torch.zeros(out_features, groups))
            portable = torch.zeros(out_features, in_features // 2, dtype=torch.uint8)
            self.register_buffer("weight", portable)
            self.register_buffer("packed", None, persistent=False)
            self.register_buffer("packed_grid", None, persistent=False)
            self._pack()
            self.register_load_state_dict_post_hook(WeightOnlyLinear._pack_loaded)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.register_buffer("input_scale", torch.ones(in_features) if input_scale else None)

    @classmethod
    def from_codes(
        cls,
        layer: nn.Linear,
        codes: torch.Tensor,
        scale: torch.Tensor,
        minimum: torch.Tensor | None = None,
        *,
        bits: int,
        group_size: int | None = None,
        input_scale: torch.Tensor | None = None,
    ) -> WeightOnlyLinear:
        """The layer for ``layer``'s shape and bias with the given codes (int8 for 8 bits,
        uint8 0..15 for 4) and grid (``scale`` and, for 4 bits, ``minimum`` per group)."""
        new = cls(
            layer.in_features,
            layer.out_features,
            bits,
            group_size,
            layer.bias is not None,
            input_scale is not None,
        )
        with torch.no_grad():
            _store(new, codes, scale, minimum)
            if bits == 4:
                new._pack()
            if layer.bias is not None:
                new.bias.copy_(layer.bias)
            if input_scale is not None:
                new.input_scale.copy_(input_scale)
        return new

    @property
    def kernel(self) -> bool:
        """Whether the layer computes with a weight-only kernel (else it dequantizes)."""
        return self.bits == 8 or (
            self.out_features % _INT4_BLOCK == 0 and self.group_size in GROUP_SIZES
        )

    def _pack(self) -> None:
        """Put the codes in the int4 kernel's layout, and its grid (per group, ``(q - 8) *
        scale + zero``: zero = minimum + 8 * scale) in bfloat16, once, where the kernel fits."""
        if not self.kernel:
            return
        self.packed = aten._convert_weight_to_int4pack_for_cpu(self.codes().to(torch.int32), 1)
        zero = self.minimum + 8 * self.scale
        grid = torch.stack([self.scale.T, zero.T], -1)
        self.packed_grid = grid.to(torch.bfloat16).contiguous()

    def codes(self) -> torch.Tensor:
        """The stored codes as (out, in) integers."""
        return self.weight if self.bits == 8 else _nibbles(self.weight)

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight the layer computes with."""
        codes = self.weight if self.bits == 8 else _nibbles(self.weight, torch.float32)
        return dequantize(codes, self.scale, self.minimum, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x * self.input_scale.to(x.dtype)
        flat = x.reshape(-1, self.in_features)
        if len(flat) > KERNEL_ROWS or not self.kernel:
            y = flat @ self.dequantized_weight().to(x.dtype).T
        else:  # the kernels are built for 16-bit activations: 3x faster than with float32
            dtype = torch.bfloat16 if x.dtype == torch.float32 else x.dtype
            if self.bits == 8:
                scale = self.scale[:, 0].to(dtype)
                y = torch._weight_int8pack_mm(flat.to(dtype), self.weight, scale).to(x.dtype)
            else:
                grid = self.packed_grid.to(dtype)
                y = aten._weight_int4pack_mm_for_cpu(
                    flat.to(dtype), self.packed, self.group_size, grid
                ).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def storage_bytes(self) -> int:
        """Bytes of the stored weight (as saved: the portable codes), its grid and bias."""
        tensors = [self.weight, self.scale, self.minimum, self.bias, self.input_scale]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def extra_repr(self) -> str:
        path = "kernel" if self.kernel else "dequantize"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}, {path}"
        )

    @staticmethod
    def _pack_loaded(module: Any, _: Any) -> None:
        module._pack()


class WeightOnlyEmbedding(nn.Module):
    """An embedding table in int8 per row (one scale per token) or int4 per group of
    ``group_size`` columns (scale and minimum), in the portable layout of
    ``WeightOnlyLinear``; a lookup dequantizes only the rows it reads.

    Example::

        table = WeightOnlyEmbedding.from_codes(nn.Embedding(1000, 64), codes, scale, None, bits=8)
        vectors = table(torch.tensor([[1, 5, 7]]))   # (1, 3, 64) float32
    """

    def __init__(
        self, num_embeddings: int, embedding_dim: int, bits: int = 8, group_size: int | None = None
    ) -> None:
        super().__init__()
        group_size = embedding_dim if bits == 8 else group_size
        if bits not in (4, 8) or group_size is None or embedding_dim % group_size:
            raise ValueError(f"{bits} bits in groups of {group_size} do not fit {embedding_dim}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.bits, self.group_size = bits, group_size
        groups = embedding_dim // group_size
        stored = (embedding_dim, torch.int8) if bits == 8 else (embedding_dim // 2, torch.uint8)
        self.register_buffer("weight", torch.zeros(num_embeddings, stored[0], dtype=stored[1]))
        self.register_buffer("scale", torch.ones(num_embeddings, groups))
        minimum = torch.zeros(num_embeddings, groups) if bits == 4 else None
        self.register_buffer("minimum", minimum)

    @classmethod
    def from_codes(
        cls,
        table: nn.Embedding,
        codes: torch.Tensor,
        scale: torch.Tensor,
        minimum: torch.Tensor | None,
        *,
        bits: int,
        group_size: int | None = None,
    ) -> WeightOnlyEmbedding:
        """The table for ``table``'s shape with the given codes and grid (as ``rtn`` gives)."""
        new = cls(table.num_embeddings, table.embedding_dim, bits, group_size)
        with torch.no_grad():
            _store(new, codes, scale, minimum)
        return new

    def dequantized_weight(self) -> torch.Tensor:
        """The whole float table."""
        return self(torch.arange(self.num_embeddings))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        codes = self.weight[ids]
        codes = codes if self.bits == 8 else _nibbles(codes, torch.float32)
        minimum = None if self.minimum is None else self.minimum[ids]
        return dequantize(codes, self.scale[ids], minimum, self.group_size)

    def storage_bytes(self) -> int:
        """Bytes of the stored codes and their grid."""
        tensors = [self.weight, self.scale, self.minimum]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, "
            f"group_size={self.group_size}"
        )

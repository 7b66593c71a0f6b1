"""The built-in passes of fxcomp, imported as ``fxcomp.passes``.

Each constructor returns a configured ``Pass``; ``BUILTIN`` maps the names the CLI accepts
to the constructors.

Example::

    from fxcomp.passes import fuse, dce
    fxcomp.compile(model, x, passes=[fuse(), dce()])
"""

from types import MappingProxyType

from fxcomp.passes.attention import UnpackOptions, unpack_attention, unpack_multihead_attention
from fxcomp.passes.bias_correction import correct_bias
from fxcomp.passes.calibration import calibrate, run_calibration
from fxcomp.passes.common_subexpressions import cse, eliminate_common_subexpressions
from fxcomp.passes.dead_code import dce, eliminate_dead_code
from fxcomp.passes.distillation import DistillOptions, distill, distill_student
from fxcomp.passes.dynamic_quantization import DynamicOptions, quantize_dynamic
from fxcomp.passes.equalization import equalize
from fxcomp.passes.freezing import freeze, freeze_qparams
from fxcomp.passes.fusion import FuseOptions, fuse, fuse_conv_bn_relu
from fxcomp.passes.lowering import lower, lower_to_kernels
from fxcomp.passes.observers import insert_observers, observe
from fxcomp.passes.pruning import prune, prune_channels, pruning_plan, zero_channels
from fxcomp.passes.qat import QATOptions, qat, train_quantization_aware
from fxcomp.passes.quantization import quantize
from fxcomp.passes.smoothing import smooth_quant
from fxcomp.passes.sparsity import SparsifyOptions, sparsify, sparsify_weights
from fxcomp.passes.weight_casting import HalfWeightLayer, cast_weights
from fxcomp.passes.weight_sharing import SharedWeightLayer, ShareOptions, share_weights

__all__ = [
    "BUILTIN",
    "DistillOptions",
    "DynamicOptions",
    "FuseOptions",
    "HalfWeightLayer",
    "QATOptions",
    "ShareOptions",
    "SharedWeightLayer",
    "SparsifyOptions",
    "UnpackOptions",
    "calibrate",
    "cast_weights",
    "correct_bias",
    "cse",
    "dce",
    "distill",
    "distill_student",
    "eliminate_common_subexpressions",
    "eliminate_dead_code",
    "equalize",
    "freeze",
    "freeze_qparams",
    "fuse",
    "fuse_conv_bn_relu",
    "insert_observers",
    "lower",
    "lower_to_kernels",
    "observe",
    "prune",
    "prune_channels",
    "pruning_plan",
    "qat",
    "quantize",
    "quantize_dynamic",
    "run_calibration",
    "share_weights",
    "smooth_quant",
    "sparsify",
    "sparsify_weights",
    "train_quantization_aware",
    "unpack_attention",
    "unpack_multihead_attention",
    "zero_channels",
]

BUILTIN = MappingProxyType(
    {
        "fuse": fuse,
        "cse": cse,
        "dce": dce,
        "prune": prune,
        "sparsify": sparsify,
        "quantize": quantize,
        "quantize_dynamic": quantize_dynamic,
        "unpack_attention": unpack_attention,
        "equalize": equalize,
        "smooth_quant": smooth_quant,
        "cast_weights": cast_weights,
        "share_weights": share_weights,
    }
)

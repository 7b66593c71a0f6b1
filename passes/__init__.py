"""The built-in passes of fxcomp, imported as ``fxcomp.passes``: one name per pass.

Each is a constructor taking keyword-only options and returning a ``Pass`` (or, for the
passes made of steps, a ``Pipeline``) that carries its options; the report records them.
The machinery behind the passes lives in ``fxcomp.nn``, ``fxcomp.quant`` and
``fxcomp.pruning``. ``BUILTIN`` maps the names the CLI accepts to the constructors.

Example::

    from fxcomp.passes import fuse, dce
    fxcomp.compile(model, x, passes=[fuse(), dce()])
"""

from types import MappingProxyType

from fxcomp.passes.attention import unpack_attention
from fxcomp.passes.bias_correction import correct_bias
from fxcomp.passes.common_subexpressions import cse
from fxcomp.passes.dead_code import dce
from fxcomp.passes.distillation import distill
from fxcomp.passes.dynamic_quantization import quantize_dynamic
from fxcomp.passes.equalization import equalize
from fxcomp.passes.fusion import fuse
from fxcomp.passes.pruning import prune
from fxcomp.passes.qat import qat
from fxcomp.passes.quantization import quantize
from fxcomp.passes.rounding import learn_rounding
from fxcomp.passes.smoothing import smooth_quant
from fxcomp.passes.sparsity import sparsify
from fxcomp.passes.weight_casting import cast_weights
from fxcomp.passes.weight_quantization import quantize_weights
from fxcomp.passes.weight_sharing import share_weights
from fxcomp.quant.pipeline import calibrate, freeze, lower, observe

__all__ = [
    "BUILTIN",
    "calibrate",
    "cast_weights",
    "correct_bias",
    "cse",
    "dce",
    "distill",
    "equalize",
    "freeze",
    "fuse",
    "learn_rounding",
    "lower",
    "observe",
    "prune",
    "qat",
    "quantize",
    "quantize_dynamic",
    "quantize_weights",
    "share_weights",
    "smooth_quant",
    "sparsify",
    "unpack_attention",
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
        "quantize_weights": quantize_weights,
        "unpack_attention": unpack_attention,
        "equalize": equalize,
        "smooth_quant": smooth_quant,
        "cast_weights": cast_weights,
        "share_weights": share_weights,
    }
)

"""The built-in passes of fxcomp, imported as ``fxcomp.passes``.

Each constructor returns a configured ``Pass``; ``BUILTIN`` maps the names the CLI accepts
to the constructors.

Example::

    from fxcomp.passes import fuse, dce
    fxcomp.compile(model, x, passes=[fuse(), dce()])
"""

from types import MappingProxyType

from fxcomp.passes.common_subexpressions import cse, eliminate_common_subexpressions
from fxcomp.passes.dead_code import dce, eliminate_dead_code
from fxcomp.passes.fusion import FuseOptions, fuse, fuse_conv_bn_relu

__all__ = [
    "BUILTIN",
    "FuseOptions",
    "cse",
    "dce",
    "eliminate_common_subexpressions",
    "eliminate_dead_code",
    "fuse",
    "fuse_conv_bn_relu",
]

BUILTIN = MappingProxyType({"fuse": fuse, "cse": cse, "dce": dce})

"""fxcomp's own quantization primitives: schemes, observers and fake-quant steps.

Built on core torch ops (``torch.fake_quantize_per_tensor_affine`` and friends), not on
``torch.ao.quantization``.

Example::

    from fxcomp.quant import scheme_for
    activation, weight = scheme_for("x86")
"""

from fxcomp.quant.observers import (
    OBSERVERS,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    Observer,
)
from fxcomp.quant.scheme import ENGINES, Engine, QScheme, scheme_for

__all__ = [
    "ENGINES",
    "OBSERVERS",
    "Engine",
    "HistogramObserver",
    "MSEObserver",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "Observer",
    "QScheme",
    "scheme_for",
]

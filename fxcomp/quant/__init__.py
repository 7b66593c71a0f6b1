"""Quantization's machinery: engines and schemes (``scheme``), the graph's one ``QuantConfig``
(``config``), observers and fake quantization, the reference Q/DQ graph (``reference``),
which ops quantize how (``ops``), the observe -> calibrate -> freeze pipeline
(``pipeline``: ``observe``, ``calibrate``, ``freeze``), lowering to fbgemm/qnnpack kernels
(``lowering``), QAT (``qat``), the per-layer sensitivity analysis (``sensitivity``) and
mixed precision (``mixed_precision``).

Built on core torch ops (``torch.fake_quantize_per_tensor_affine`` and friends), not on
``torch.ao.quantization``; only lowering uses the fbgemm/qnnpack kernels themselves.

Example::

    from fxcomp.quant import QuantConfig
    activation, weight = QuantConfig("x86").schemes()
"""

from fxcomp.quant.config import QuantConfig
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
    "QuantConfig",
    "scheme_for",
]

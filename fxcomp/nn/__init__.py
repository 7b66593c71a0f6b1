"""The modules passes create and the helpers that build them: fused units, BatchNorm folding,
attention with separate projections, and rescalable layer pairs.

Example::

    from fxcomp.nn.fused import ConvReLU
    unit = ConvReLU(torch.nn.Conv2d(3, 8, 3))
"""

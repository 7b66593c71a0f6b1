"""The lowest layer: torch.fx graph helpers, capture (tracing and shape propagation), rewrite
rules as data, typed graph slots, module copies, graph save/load, atomic file writes and the
one error hierarchy. Nothing here knows about passes, quantization or backends.

Example::

    from fxcomp.ir.capture import trace
    gm = trace(model, torch.randn(1, 3, 224, 224))
"""

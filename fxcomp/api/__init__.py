"""The library's entry points: ``compile`` and ``analyze``.

Example::

    from fxcomp.api.compile import compile
    result = compile(model, torch.randn(1, 3, 224, 224), passes=[fxcomp.passes.fuse()])
"""

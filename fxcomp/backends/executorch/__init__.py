"""ExecuTorch: ``.pte`` programs delegated to XNNPACK, in the self-describing bundle.

Example::

    from fxcomp.backends.executorch.backend import ExecuTorchBackend
    bundle = ExecuTorchBackend().load("out/model.fxbundle")
"""

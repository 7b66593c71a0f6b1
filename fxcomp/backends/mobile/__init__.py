"""The mobile backend: a lite-interpreter program in a self-describing bundle.

Example::

    from fxcomp.backends.bundle import load_bundle
    bundle = load_bundle("out/model.fxbundle")
"""

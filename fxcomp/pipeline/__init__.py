"""Running passes: the pass manager and its checks, the compile config and state that
passes share, and the report they write.

Example::

    from fxcomp.pipeline.pass_manager import PassManager
    result, records = PassManager([my_pass]).run(gm, ctx)
"""

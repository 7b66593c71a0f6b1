"""Running models: the training loop and its objectives, torchrun support, interleaved
latency measurement, and the parity figures artifacts are checked with.

Example::

    from fxcomp.runtime.latency import median_latency
    ms = median_latency({"float": model, "int8": int8}, [(x,)], rounds=50)
"""

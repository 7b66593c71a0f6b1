"""Channel pruning's machinery: the channel dependency graph and its per-op rules, attention
coupling, the plan (importance and what goes), applying it, and the per-layer report.

Example::

    from fxcomp.pruning.graph import ChannelGraph
    groups = ChannelGraph.build(gm).groups()
"""

"""What people look at: the HTML report, figures as PNG, and graph dumps.

Example::

    from fxcomp.reporting.dump import render_graph
    text = render_graph(gm, "table")
"""

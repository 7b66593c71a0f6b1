"""The OpenVINO backend (``fxcomp.backends.openvino.backend``) and runtime.

Example::

    from fxcomp.backends.openvino.backend import OpenVinoBackend
"""

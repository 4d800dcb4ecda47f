"""hardener: protect image-restoration ONNX models against unauthorized distillation (ASVP)."""
__version__ = "0.1.0"

"""hardener: protect image-restoration ONNX models against unauthorized distillation (ASVP)."""
__version__ = "0.1.0"

from .api import HardenConfig, HardenResult, harden  # noqa: E402
from .asvp import AsvpParams  # noqa: E402
from .errors import HardenerError  # noqa: E402
from .validate import Budgets  # noqa: E402

__all__ = ["AsvpParams", "Budgets", "HardenConfig", "HardenResult", "HardenerError", "harden", "__version__"]

"""fastopt: fused multi-tensor optimizers for PyTorch.

Drop-in replacements for torch.optim (``fastopt.Adam``, ``fastopt.SGD``, ...) and a
generic :class:`FusedOptimizer` for any rule of Dozat's hyperalgorithm family
(:class:`fastopt.spec.Spec`), each run by the fastest available backend: C++ on the CPU,
Triton or CUDA C++ on the GPU, torch's ``_foreach`` ops anywhere.
"""

from . import presets, schedules
from .backends import backends as available_backends
from .optim import FusedOptimizer
from .presets import SGD, Adadelta, Adagrad, Adam, Adamax, AdamW, NAdam, RAdam, RMSprop
from .spec import Spec, SpecError, family

__all__ = [
    "SGD",
    "Adadelta",
    "Adagrad",
    "Adam",
    "AdamW",
    "Adamax",
    "FusedOptimizer",
    "NAdam",
    "RAdam",
    "RMSprop",
    "Spec",
    "SpecError",
    "available_backends",
    "family",
    "presets",
    "schedules",
]
__version__ = "0.1.0"

"""TEST-ONLY shim: ``torchvision.transforms.functional.center_crop`` and nothing else."""

from . import functional

__all__ = ["functional"]

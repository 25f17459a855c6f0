"""nanopali: a from-scratch, hackable PyTorch implementation of PaliGemma and PaliGemma 2."""

from .config import ConfigError, PaliGemmaConfig, TextConfig, VisionConfig
from .model import PaliGemma, PaliGemmaOutput
from .weights import CheckpointError

__all__ = [
    "CheckpointError", "ConfigError", "PaliGemma", "PaliGemmaConfig", "PaliGemmaOutput", "TextConfig", "VisionConfig",
]

"""nanopali: a from-scratch, hackable PyTorch implementation of PaliGemma and PaliGemma 2."""

from .config import ConfigError, PaliGemmaConfig, TextConfig, VisionConfig
from .images import ImageError, load_image
from .model import PaliGemma, PaliGemmaOutput
from .pipeline import Pali, load
from .processor import Processor
from .streaming import stream
from .tokenizer import Tokenizer, TokenizerError
from .weights import CheckpointError

__all__ = [
    "CheckpointError", "ConfigError", "ImageError", "Pali", "PaliGemma", "PaliGemmaConfig", "PaliGemmaOutput", "Processor",
    "TextConfig", "Tokenizer", "TokenizerError", "VisionConfig", "load", "load_image", "stream",
]

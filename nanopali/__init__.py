"""nanopali: a from-scratch, hackable PyTorch implementation of PaliGemma and PaliGemma 2."""

from nanopali.config import ConfigError, PaliGemmaConfig, TextConfig, VisionConfig
from nanopali.inference.generate import GenerateOutput, generate
from nanopali.inference.runtime import Runtime, prepare
from nanopali.inference.streaming import stream
from nanopali.inputs.images import ImageError, load_image
from nanopali.inputs.processor import Processor
from nanopali.inputs.tokenizer import Tokenizer, TokenizerError
from nanopali.io.hf_checkpoint import CheckpointError
from nanopali.models.paligemma import PaliGemma, PaliGemmaOutput
from nanopali.pipeline import Pali, load

__all__ = [
    "CheckpointError", "ConfigError", "GenerateOutput", "ImageError", "Pali", "PaliGemma", "PaliGemmaConfig", "PaliGemmaOutput", "Processor",
    "Runtime", "TextConfig", "Tokenizer", "TokenizerError", "VisionConfig", "generate", "load", "load_image", "prepare",
    "stream",
]

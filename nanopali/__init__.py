"""nanopali: a from-scratch, hackable PyTorch implementation of PaliGemma, PaliGemma 2 and SigLIP."""

from nanopali.config import ConfigError, PaliGemmaConfig, TextConfig, VisionConfig
from nanopali.siglip_config import SigLIPConfig
from nanopali.inference.generate import GenerateOutput, generate
from nanopali.inference.runtime import Runtime, prepare
from nanopali.inference.streaming import stream
from nanopali.inputs.images import ImageError, load_image
from nanopali.inputs.processor import Processor
from nanopali.inputs.siglip_processor import SigLIPProcessor
from nanopali.inputs.tokenizer import Tokenizer, TokenizerError
from nanopali.io.hf_checkpoint import CheckpointError
from nanopali.models.contrastive import SigLIP, SigLIPOutput
from nanopali.models.paligemma import PaliGemma, PaliGemmaOutput
from nanopali.pipeline import Pali, load
from nanopali.zero_shot import Contrastive, load_contrastive

__all__ = [
    "CheckpointError", "ConfigError", "Contrastive", "GenerateOutput", "ImageError", "Pali", "PaliGemma", "PaliGemmaConfig", "PaliGemmaOutput", "Processor",
    "Runtime", "SigLIP", "SigLIPConfig", "SigLIPOutput", "SigLIPProcessor", "TextConfig", "Tokenizer", "TokenizerError", "VisionConfig", "generate", "load", "load_contrastive", "load_image", "prepare",
    "stream",
]

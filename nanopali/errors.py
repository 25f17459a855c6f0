"""nanopali's exceptions: every problem with what the user gave is a NanopaliError (the CLI prints it as one line).

    NanopaliError
    ├── UsageError (ValueError)              an option or argument that cannot work
    ├── MissingFileError (FileNotFoundError) a file or directory that is not there
    ├── ConfigError (ValueError)             config.json
    ├── CheckpointError (ValueError)         weights: safetensors, the mask VQ-VAE
    ├── ImageError (ValueError)              an image input
    │   ├── ImageNotFoundError (FileNotFoundError)
    │   └── ImageTooLargeError
    ├── TokenizerError (ValueError)          tokenizer files
    └── DataError (ValueError)               training examples

Each also keeps its built-in base, so `except ValueError` / `except FileNotFoundError` still catch it.
Any other exception is a bug in nanopali (or in the caller's code) and keeps its traceback.
The modules that raise them re-export them (`from nanopali.config import ConfigError` works).
This module imports nothing from the project.
"""


class NanopaliError(Exception):
    """A problem with what the user gave: a file, an option, an input; the CLI prints it as one line."""


class UsageError(NanopaliError, ValueError):
    """An option or argument that cannot work (alone or with the others given)."""


class MissingFileError(NanopaliError, FileNotFoundError):
    """A file or directory that was named (or is needed) but does not exist."""


class ConfigError(NanopaliError, ValueError):
    """A config.json that nanopali cannot interpret without guessing."""


class CheckpointError(NanopaliError, ValueError):
    """A checkpoint directory or file that does not hold what the model needs."""


class ImageError(NanopaliError, ValueError):
    """An input that cannot be used as an image; the message says which input and why."""


class ImageNotFoundError(ImageError, FileNotFoundError):
    """An image path that does not exist."""


class ImageTooLargeError(ImageError):
    """An image with more pixels than allowed (a decompression bomb, or just too big)."""


class TokenizerError(NanopaliError, ValueError):
    """Tokenizer files that are missing, contradictory or not a Gemma SentencePiece model."""


class DataError(NanopaliError, ValueError):
    """A training example that cannot be used."""

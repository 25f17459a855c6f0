"""Checkpoint files: weights in the Hugging Face safetensors layout."""

"""The models, plain PyTorch: the SigLIP vision tower, the Gemma decoder and PaliGemma, which joins them."""

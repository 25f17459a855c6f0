"""Plain PyTorch building blocks shared by the models: attention, masks, RoPE, norms, MLPs, the suffix loss."""

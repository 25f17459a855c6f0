"""The toy shapes world: scenes, their examples, its tokenizer and evaluation, and the default model's recipe.

    scenes.py        seeded scenes (scene_rng), drawn with their masks and per-patch labels
    examples.py      a scene's captions, questions, detect/segment/ocr examples in PaliGemma syntax
    tokenizer.py     the world's SentencePiece tokenizer          vqvae.py   the mask VQ-VAE trained on it
    patch_warmup.py  the vision tower's per-patch warm-up         eval.py    held-out scores of a model
    recipe/          how the shipped default_model/ was made

Nothing in the core package imports this one; it imports the core.
"""

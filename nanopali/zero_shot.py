"""The contrastive pipeline: a SigLIP model for zero-shot classification, embeddings and image search.

    clip = nanopali.load_contrastive("path/to/siglip-base-patch16-224")   # no path: the shipped toy-world SigLIP
    clip.classify("cat.jpg", ["cat", "dog", "a red car"], template="a photo of {}.")
        -> [("cat", 0.91), ("a red car", 0.02), ("dog", 0.01)]             sorted; a list of such lists for a list
    clip.embed_images(["a.jpg", "b.jpg"]) / clip.embed_texts(["a cat"])     (N, D) float32, L2-normalized
    clip.search("folder/of/images", "a red car", top_k=5) -> [("folder/b.jpg", 0.83, 0.41), ...]

Probabilities follow the model's objective (SigLIP.probabilities): each label's own sigmoid for SigLIP models (they
need not sum to 1: an image may match several labels or none), a softmax over the labels for CLIP-style ones.
`search` ranks the images by the logit of (image, query), i.e. by cosine similarity, and caches the image
embeddings in `nanopali-embeddings.npy` (+ `.json` naming the model and each file's size and mtime) in the folder,
so a second search embeds only new or changed files.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from nanopali.devices import resolve_device, resolve_dtype
from nanopali.errors import UsageError
from nanopali.inputs.images import load_image
from nanopali.inputs.siglip_processor import SigLIPProcessor, TextTruncatedWarning
from nanopali.io.hf_checkpoint import checkpoint_dir
from nanopali.models.contrastive import SigLIP
from nanopali.paths import default_siglip_dir

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
CACHE = "nanopali-embeddings"


def load_contrastive(path: str | Path | None = None, dtype: torch.dtype | str = torch.float32,
                     device: str | torch.device = "cpu", progress: bool = False) -> "Contrastive":
    """A SigLIP checkpoint directory (config.json, safetensors, tokenizer, preprocessor_config.json), ready for
    inference; path=None loads the shipped default, a small SigLIP of the toy shapes world."""
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    path = checkpoint_dir(default_siglip_dir() if path is None else path)
    model = SigLIP.from_pretrained(path, dtype=dtype, device=device, progress=progress).eval()
    return Contrastive(model, SigLIPProcessor.from_pretrained(path), model_dir=path)


class Contrastive:
    def __init__(self, model: SigLIP, processor: SigLIPProcessor, model_dir: str | Path | None = None,
                 batch_size: int = 32):
        self.model, self.processor, self.model_dir, self.batch_size = model, processor, model_dir, batch_size

    @torch.no_grad()
    def embed_images(self, images) -> torch.Tensor:
        """One image or a list (anything load_image takes) -> (N, D) float32 L2-normalized features."""
        images = images if isinstance(images, (list, tuple)) else [images]
        if not images:
            raise UsageError("no images were given (an empty list)")
        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.processor.preprocess_images(images[start:start + self.batch_size]).to(self.model.device)
            out.append(self.model.get_image_features(pixels).float())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1).cpu()

    @torch.no_grad()
    def embed_texts(self, texts: str | Sequence[str]) -> torch.Tensor:
        """One text or a list -> (N, D) float32 L2-normalized features (a text over the model's length is cut,
        with a TextTruncatedWarning)."""
        ids = self.processor.encode_texts(texts)
        out = [self.model.get_text_features(ids[s:s + self.batch_size].to(self.model.device)).float()
               for s in range(0, len(ids), self.batch_size)]
        return torch.nn.functional.normalize(torch.cat(out), dim=-1).cpu()

    @torch.no_grad()
    def logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """(N_img, N_txt) logits of normalized embeddings: exp(t') * cos + b."""
        return self.model.logits(image_embeds.to(self.model.device), text_embeds.to(self.model.device)).cpu()

    def classify(self, images, labels: str | Sequence[str], template: str = "{}") -> list:
        """Each label's probability for each image, sorted from the likeliest: [(label, p), ...] for one image,
        a list of those for a list of images. `template` turns a label into the text ("a photo of {}.")."""
        labels = parse_labels(labels)
        if not isinstance(template, str) or template.count("{}") != 1:
            raise UsageError(f"template must be a string with one {{}} where the label goes, got {template!r}")
        single = not isinstance(images, (list, tuple))
        probs = self.model.probabilities(self.logits(self.embed_images(images),
                                                     self.embed_texts([template.format(x) for x in labels])))
        ranked = [sorted(zip(labels, row.tolist()), key=lambda pair: -pair[1]) for row in probs]
        return ranked[0] if single else ranked

    def search(self, folder: str | Path, query: str, top_k: int | None = 10, cache: bool = True) -> list[tuple]:
        """The images of `folder` (not its subfolders) ranked by similarity to `query`:
        [(path, probability, cosine), ...], best first, at most top_k (None: all)."""
        files = image_files(folder)
        if not isinstance(query, str) or not query.strip():
            raise UsageError("the search query must be a non-empty string")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise UsageError(f"top_k must be a positive int or None, got {top_k!r}")
        embeds = self._folder_embeddings(Path(folder), files, cache)
        text = self.embed_texts([query])
        cos, logits = (embeds @ text.T)[:, 0], self.logits(embeds, text)[:, 0]
        probs = logits.sigmoid() if self.model.config.objective == "siglip" else logits.softmax(0)  # clip: over images
        order = cos.argsort(descending=True)[:top_k]
        return [(files[i], float(probs[i]), float(cos[i])) for i in order.tolist()]

    def _folder_embeddings(self, folder: Path, files: list[Path], cache: bool) -> torch.Tensor:
        """Embeddings of `files`, reusing the folder's cache for files whose size and mtime are unchanged."""
        model_id = str(Path(self.model_dir).resolve()) if self.model_dir is not None else "unsaved model"
        stamps = [_stamp(f) for f in files]
        cached = _read_cache(folder, model_id) if cache else {}
        missing = [f for f, s in zip(files, stamps) if f.name not in cached or cached[f.name][0] != s]
        fresh = dict(zip((f.name for f in missing), self.embed_images([load_image(f) for f in missing]))) if missing else {}
        rows = [fresh[f.name] if f.name in fresh else torch.from_numpy(cached[f.name][1]) for f in files]
        embeds = torch.stack(rows).float()
        if cache and missing:
            _write_cache(folder, model_id, files, stamps, embeds)
        return embeds


def parse_labels(labels: str | Sequence[str]) -> list[str]:
    """"cat, dog, a red car" or ["cat", "dog"] -> stripped, non-empty labels; a UsageError when none is left."""
    if isinstance(labels, str):
        labels = labels.split(",")
    if not isinstance(labels, (list, tuple)) or not all(isinstance(x, str) for x in labels):
        raise UsageError(f"labels must be a comma-separated string or a list of strings, got {type(labels).__name__}")
    parsed = [x.strip() for x in labels if x.strip()]
    if not parsed:
        raise UsageError(f"no labels to classify with: {list(labels)!r} holds no non-empty label (separate labels "
                         "with commas: \"cat, dog\")")
    if len(set(parsed)) != len(parsed):
        raise UsageError(f"a label is given twice: {parsed}")
    return parsed


def image_files(folder: str | Path) -> list[Path]:
    """The image files directly in `folder`, sorted; a UsageError when it is not a folder or holds none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a directory of images")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UsageError(f"{folder} holds no images (files ending in {', '.join(IMAGE_SUFFIXES)})")
    return files


def _stamp(file: Path) -> tuple[int, int]:
    st = file.stat()
    return st.st_size, st.st_mtime_ns


def _read_cache(folder: Path, model_id: str) -> dict:
    """{file name: ((size, mtime_ns), embedding)} from the folder's cache, or {} when there is none for this model."""
    meta, array = folder / f"{CACHE}.json", folder / f"{CACHE}.npy"
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
        embeds = np.load(array)
    except (OSError, ValueError):
        return {}
    if info.get("model") != model_id or len(info.get("files", [])) != len(embeds):
        return {}
    return {f["name"]: ((f["size"], f["mtime_ns"]), embeds[i]) for i, f in enumerate(info["files"])}


def _write_cache(folder: Path, model_id: str, files: list[Path], stamps: list, embeds: torch.Tensor) -> None:
    """Write the cache next to the images; a folder nanopali cannot write to only loses the cache (a warning)."""
    info = {"model": model_id, "files": [{"name": f.name, "size": s[0], "mtime_ns": s[1]} for f, s in zip(files, stamps)]}
    try:
        tmp = folder / f".{CACHE}.{os.getpid()}.npy"
        np.save(tmp, embeds.numpy())
        os.replace(tmp, folder / f"{CACHE}.npy")
        (folder / f"{CACHE}.json").write_text(json.dumps(info) + "\n", encoding="utf-8")
    except OSError as e:
        warnings.warn(f"could not write the embedding cache in {folder} ({e.strerror}); the next search embeds again")


__all__ = ["Contrastive", "TextTruncatedWarning", "image_files", "load_contrastive", "parse_labels"]

"""The high-level object: image and task in, text, boxes or masks out — the one path the CLI and the server use.

    pali = nanopali.load("path/to/checkpoint", dtype=torch.bfloat16)
    pali = nanopali.load()                # the shipped default: a small model of the toy shapes world only
    pali.caption(image); pali.answer(image, "what is it?"); pali.ocr(image)
    pali.detect(image, ["cat", "dog"])    -> [Detection(label, box, score)]         box in original pixels
    pali.segment(image, ["cat"])          -> [Segmentation(label, box, mask, score)] mask bool (H, W)
    pali.generate(image, "any prompt"); pali.stream(image, prompt)
    batch = pali.batch(); batch.add([pali.row(image, "caption en")]); batch.step() ...; pali.result(row)

Every method also takes a list of images (and, for generate, a list of prompts) and then returns a
list. Prompts follow PaliGemma's task syntax ("caption en", "answer en …", "detect a ; b",
"segment a", "ocr"). `row` / `batch` / `result` serve many callers at once (nanopali.serve): rows that join a
running batch at any step and leave it when done (inference/batching.py), with the same prompts, options,
text and objects as the methods above. Scores are the geometric mean of the probabilities of an object's tokens.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nanopali.devices import resolve_device, resolve_dtype
from nanopali.errors import MissingFileError, UsageError
from nanopali.inference.answers import generate_answers
from nanopali.inference.batching import Row, RowBatch, check_row
from nanopali.inference.generate import tokenizer_settings
from nanopali.inference.options import GenerationOptions
from nanopali.inference.quantize import load_quantized
from nanopali.inference.runtime import Runtime, check_compile, prepare
from nanopali.inference.streaming import stream
from nanopali.inputs.images import DEFAULT_MAX_PIXELS, load_image
from nanopali.inputs.processor import Processor
from nanopali.inputs.tokenizer import check_text
from nanopali.io import big_vision
from nanopali.io.hf_checkpoint import checkpoint_dir
from nanopali.models.paligemma import PaliGemma
from nanopali.paths import model_dir
from nanopali.registry import resolve_config
from nanopali.tasks import ParsedObjects, SegmentationVAE, find_checkpoint, parse_objects

VAE_FILE = "vae-oid.npz"
TOKENIZER_FILE = "paligemma_tokenizer.model"  # big_vision's tokenizer, which a release .npz needs beside it
TOKENIZER_URL = "gs://big_vision/paligemma_tokenizer.model"
TASK_TOKENS = {"caption": 64, "answer": 32, "ocr": 128, "detect": 128, "segment": 256, "generate": 64}


@dataclass
class Detection:
    label: str
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) pixels of the original image, x1/y1 exclusive
    score: float


@dataclass
class Segmentation:
    label: str
    box: tuple[int, int, int, int]
    mask: np.ndarray                 # bool (H, W) of the original image
    score: float


class Objects(list):
    """Detections or segmentations of one image, with the raw answer and the objects that were dropped."""

    def __init__(self, items, text: str = "", dropped=()):
        super().__init__(items)
        self.text, self.dropped = text, list(dropped)  # dropped: DroppedObject(text, reason, span)


def load(path: str | Path | None = None, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
         vae: str | Path | None = None, progress: bool = False, quantize: str | None = None, fast: bool = True,
         config=None, tokenizer: str | Path | None = None, compile: bool = False) -> "Pali":
    """Load a checkpoint directory (weights, config, tokenizer; `vae-oid.npz` beside them for segment), or a
    big_vision release .npz with `config=` (a published size such as "paligemma-3b-224", a config.json or a
    PaliGemmaConfig) and `tokenizer=` (big_vision's paligemma_tokenizer.model; default: that file beside the npz).

    path=None loads the shipped default model, a small PaliGemma of the toy shapes world; a name of
    paths.NAMED (e.g. "moe") the model shipped under it, if any (a directory of that name wins).
    quantize="int8"/"int4" quantizes the decoder (inference/quantize.py), as it is read from a checkpoint directory
    (a big_vision .npz: after loading). fast=False keeps the plain decode
    step everywhere (no compiled CPU kernel, no CUDA graph), for debugging (inference/runtime.prepare).
    compile=True runs the decode step through torch.compile (a GPU's opt-in; inference/compiled.py).
    `dtype` may be named ("bfloat16", "bf16", "float32"…); `device`, `dtype`, the config and the tokenizer are
    checked before the weights are read: "cuda" without a GPU torch can see, a misspelt device or a non-float
    dtype is a UsageError.
    """
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    check_compile(compile, device, fast)
    if big_vision.is_npz(path):
        big_vision.check_file(path)  # the file, then the config, then the tokenizer: all before the weights
        config = resolve_config(config)
        processor = Processor.from_config(config, release_tokenizer(path, tokenizer))
        model = PaliGemma.from_big_vision(path, config, dtype=dtype, device=device, progress=progress)
        folder = Path(path).parent
    else:
        extra = [name for name, value in (("config=", config), ("tokenizer=", tokenizer)) if value is not None]
        if extra:
            raise UsageError(f"{' and '.join(extra)}: only for a big_vision .npz; a checkpoint directory carries its "
                             "own config.json and tokenizer")
        folder = checkpoint_dir(model_dir(path))
        if quantize is None:
            model = PaliGemma.from_pretrained(folder, dtype=dtype, device=device, progress=progress)
        else:  # quantized as it is read: never the float decoder in memory
            model = load_quantized(folder, quantize, dtype=dtype, device=device, progress=progress)
        processor = Processor.from_pretrained(folder)
    runtime = prepare(model, quantize=quantize, cpu_kernels=fast, cuda_graphs=fast, compile=compile)
    vae_file = Path(vae) if vae is not None else folder / VAE_FILE if (folder / VAE_FILE).is_file() else None
    return Pali(model, processor, SegmentationVAE.from_npz(vae_file) if vae_file else None, model_dir=folder,
                runtime=runtime)


def release_tokenizer(npz: str | Path, tokenizer: str | Path | None) -> Path:
    """The tokenizer file of a big_vision .npz: `tokenizer` if given, else paligemma_tokenizer.model beside it."""
    if tokenizer is not None:
        return Path(tokenizer)
    beside = Path(npz).parent / TOKENIZER_FILE
    if beside.is_file():
        return beside
    raise MissingFileError(f"a big_vision .npz carries no tokenizer and there is no {TOKENIZER_FILE} beside {npz}: "
                           f"pass tokenizer= (--tokenizer on the command line) with big_vision's {TOKENIZER_URL}")


class Pali:
    def __init__(self, model: PaliGemma, processor: Processor, vae: SegmentationVAE | None = None,
                 model_dir: str | Path | None = None, runtime: Runtime | None = None):
        self.model, self.processor, self.vae, self.model_dir = model, processor, vae, model_dir
        self.runtime = runtime or Runtime()  # how the model runs (inference/runtime.py)
        self.stats: dict[str, float] = {}  # new_tokens and seconds of the last generate/task call

    # ------------------------------------------------------------------ text

    def generate(self, images, prompts, **kwargs) -> str | list[str]:
        """Answer one prompt per image; a single image and prompt give a str, lists give a list."""
        batch = _load_images(images)
        if isinstance(prompts, str):
            prompts = [prompts] * len(batch)
        elif not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise UsageError(f"prompts must be a string or a list of strings, got {_kind(prompts)}")
        elif len(prompts) != len(batch):
            raise UsageError(f"got {len(prompts)} prompts for {len(batch)} images; give one prompt per image (or one string)")
        texts = [text for text, _ in self.generate_spans(batch, prompts, "generate", **kwargs)]
        return texts if isinstance(images, list) else texts[0]

    def stream(self, image, prompt: str, **kwargs) -> Iterator[str]:
        """The answer to one prompt as text pieces; the prompt and options are checked when this is called."""
        if not isinstance(prompt, str):
            raise UsageError(f"prompt must be a string, got {_kind(prompt)}")
        kwargs.setdefault("max_new_tokens", TASK_TOKENS["generate"])
        return stream(self.model, self.processor, load_image(image), prompt, runtime=self.runtime, **kwargs)

    def caption(self, images, lang: str = "en", **kwargs):
        _check_string("lang", lang)
        return self._text(images, f"caption {lang}", "caption", **kwargs)

    def answer(self, images, question: str, lang: str = "en", **kwargs):
        _check_string("question", question)
        _check_string("lang", lang)
        return self._text(images, f"answer {lang} {question}", "answer", **kwargs)

    def ocr(self, images, **kwargs):
        return self._text(images, "ocr", "ocr", **kwargs)

    # ------------------------------------------------------------------ boxes and masks

    def detect(self, images, labels, convention: str = "bigvision", **kwargs) -> Objects | list[Objects]:
        """Boxes of `labels` ("cat" or ["cat", "dog"]); `convention` "hfspace" reads locs as /1024."""
        out = [_as_objects("detect", objs) for objs in self._objects(images, "detect", labels, convention, **kwargs)]
        return out if isinstance(images, list) else out[0]

    def segment(self, images, labels, convention: str = "bigvision", **kwargs) -> Objects | list[Objects]:
        """Masks of `labels`; objects the model answered without <seg> tokens are dropped with that reason."""
        self._check_vae("segment")
        out = [_as_objects("segment", objs) for objs in self._objects(images, "segment", labels, convention, **kwargs)]
        return out if isinstance(images, list) else out[0]

    # ------------------------------------------------------------------ rows of a continuous batch (a server)

    def row(self, image, prompt: str, max_pixels: int | None = DEFAULT_MAX_PIXELS, on_piece=None, **kwargs) -> Row:
        """One prompt about one image, ready to join a running batch (`batch()`): the image is loaded (at most
        `max_pixels`) and the prompt and options are checked now, so a bad request fails here, alone, with a
        NanopaliError naming the problem. Options are those of `generate`; max_new_tokens defaults to the
        prompt's task (TASK_TOKENS), cut to the positions the model has left after the prompt. `on_piece`
        gets the answer's text as it is generated (on the thread that steps the batch)."""
        _check_string("prompt", prompt)
        check_text(prompt, "the prompt")
        task = prompt_task(prompt)
        if task == "segment":
            self._check_vae("segment")
        image = load_image(image, max_pixels=max_pixels)
        if "max_new_tokens" not in kwargs:
            room = self.model.config.text_config.max_position_embeddings - len(self.processor.prefix_ids(prompt))
            kwargs["max_new_tokens"] = max(1, min(TASK_TOKENS[task], room))  # a prompt that does not fit fails below
        row = Row(image, prompt, GenerationOptions(**{**tokenizer_settings(self.processor.tokenizer), **kwargs}),
                  on_piece=on_piece)
        check_row(self.model, self.processor, row)
        return row

    def batch(self) -> RowBatch:
        """A continuous batch on this model (inference/batching.py): rows from `row()` join it at any step."""
        return RowBatch(self.model, self.processor, self.runtime)

    def result(self, row: Row, convention: str = "bigvision") -> str | Objects:
        """A finished row's answer as its task gives it: the text, or for a `detect` / `segment` prompt the
        Objects that `detect` / `segment` return (boxes in pixels of the row's image)."""
        task = prompt_task(row.prompt)
        if task not in ("detect", "segment"):
            return row.answer.text
        vae = self.vae if task == "segment" else None
        objects = scored_objects(row.answer.text, row.answer.spans, row.image.size, vae, convention)
        objects.text = row.answer.text
        return _as_objects(task, objects)

    # ------------------------------------------------------------------ shared path

    def _text(self, images, prompt: str, task: str, **kwargs):
        batch = _load_images(images)
        texts = [text for text, _ in self.generate_spans(batch, [prompt] * len(batch), task, **kwargs)]
        return texts if isinstance(images, list) else texts[0]

    def _check_vae(self, task: str) -> None:
        if self.vae is None:
            find_checkpoint(None, self.model_dir)  # raises: where the VQ-VAE is looked for and how to get it

    def _objects(self, images, task: str, labels, convention: str, **kwargs) -> list[ParsedObjects]:
        if not isinstance(labels, (str, list, tuple)) or not all(isinstance(x, str) for x in labels):
            raise UsageError(f"labels must be a string or a list of strings, got {_kind(labels)}")
        labels = [labels] if isinstance(labels, str) else list(labels)
        if not labels or not all(isinstance(x, str) and x.strip() for x in labels):
            raise UsageError(f"{task} needs one or more non-empty labels, got {labels!r}")
        batch = _load_images(images)
        prompt = f"{task} " + " ; ".join(x.strip() for x in labels)
        results = []
        for image, (text, spans) in zip(batch, self.generate_spans(batch, [prompt] * len(batch), task, **kwargs)):
            objects = scored_objects(text, spans, image.size, self.vae if task == "segment" else None, convention)
            objects.text = text
            results.append(objects)
        return results

    def generate_spans(self, images: list, prompts: list[str], task: str, **kwargs) -> list[tuple[str, list]]:
        """Generate for loaded images, one prompt per row; return each row's text and its tokens'
        ((start, end), logprob) spans (for scored_objects)."""
        kwargs.setdefault("max_new_tokens", TASK_TOKENS[task])
        start = time.perf_counter()
        answers = generate_answers(self.model, self.processor, images, prompts, runtime=self.runtime, **kwargs)
        self.stats = {"new_tokens": sum(a.new_tokens for a in answers), "seconds": time.perf_counter() - start}
        return [(a.text, a.spans) for a in answers]


def prompt_task(prompt: str) -> str:
    """The task of a PaliGemma prompt, by its first word ("detect cat" -> "detect"); "generate" for any other."""
    word = prompt.split(maxsplit=1)[0] if prompt.strip() else ""
    return word if word in TASK_TOKENS else "generate"


def _as_objects(task: str, objects: ParsedObjects) -> Objects:
    """Parsed objects as the pipeline returns them: Detections, or Segmentations (an object without a mask
    is dropped with that reason)."""
    if task == "detect":
        return Objects([Detection(o.label, o.box, o.score) for o in objects], objects.text, objects.dropped)
    kept = [Segmentation(o.label, o.box, o.mask, o.score) for o in objects if o.mask is not None]
    dropped = objects.dropped + [(o.label, "no <seg> tokens: a box without a mask", o.span) for o in objects if o.mask is None]
    return Objects(kept, objects.text, dropped)


def _kind(value) -> str:
    """The type of a wrong argument, with the element types of a list ("int", "list of int")."""
    if isinstance(value, (list, tuple)):
        inner = sorted({type(x).__name__ for x in value})
        return f"{type(value).__name__} of {', '.join(inner)}" if inner else f"empty {type(value).__name__}"
    return type(value).__name__


def _check_string(name: str, value) -> None:
    if not isinstance(value, str):
        raise UsageError(f"{name} must be a string, got {_kind(value)}")


def _load_images(images) -> list:
    """One image or a list of them -> a list of RGB PIL images (each loaded once)."""
    if isinstance(images, list) and not images:
        raise UsageError("no images were given (an empty list)")
    return [load_image(im) for im in (images if isinstance(images, list) else [images])]


def scored_objects(text: str, spans, image_size, vae=None, convention: str = "bigvision") -> ParsedObjects:
    """parse_objects of an answer, each object's .score the geometric mean of its tokens' probabilities
    (0.0 for an object without tokens); spans as generate_spans returns them."""
    objects = parse_objects(text, image_size=image_size, vae=vae, convention=convention)
    for obj in objects:
        picked = [lp for (start, end), lp in spans if start < obj.span[1] and end > obj.span[0]]
        obj.score = float(np.exp(np.mean(picked))) if picked else 0.0
    return objects

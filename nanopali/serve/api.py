"""The HTTP dialect: OpenAI's chat-completions and embeddings request and response objects, the task endpoints'
JSON, and how a request becomes a PaliGemma prompt and generation options (everything here is pure: no model, no I/O).

A chat request is one user message whose content has one image_url part and text parts; the text is the
PaliGemma prompt ("caption en", "answer en ...", "detect a ; b", "segment a", "ocr"; PROMPT_WORDS), and any
other text is a question, sent as "answer en <text>". Unknown fields are refused (422, naming the field)
rather than silently ignored; `n` must be 1. temperature 0 or absent is greedy decoding (PaliGemma's own),
> 0 samples with top_p / top_k (an extra) and `seed`. `stop` strings end the answer and are cut from it, as
OpenAI does. Extras beyond OpenAI: top_k, min_tokens (vLLM's name), and for detect / segment prompts the
parsed objects in choices[0].message.objects (streaming: the last chunk's delta.objects).
"""

from __future__ import annotations

import base64
import io
import time
import uuid
from typing import Annotated, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from nanopali.errors import UsageError

PROMPT_WORDS = ("caption", "describe", "answer", "question", "ocr", "detect", "segment")  # PaliGemma's task prefixes


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ImageURL(Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted; PaliGemma sees one resolution


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]] | None = None
    name: str | None = None


class StreamOptions(Strict):
    include_usage: bool = False


class ChatRequest(Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    min_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    user: str | None = None  # accepted, unused


class TaskRequest(Strict):
    """POST /v1/detect and /v1/segment: an image and labels in, objects out."""
    model: str | None = None
    image: str  # a data URL, plain base64, or (when allowed) a file:// or http(s):// URL
    labels: str | list[str]  # "cat ; dog" or ["cat", "dog"]
    max_tokens: int | None = Field(None, ge=1)
    convention: Literal["bigvision", "hfspace"] = "bigvision"


class EmbeddingsRequest(Strict):
    """POST /v1/embeddings (a SigLIP): OpenAI's embeddings request; an input item may also be an image part
    ({"type": "image_url", "image_url": {"url": ...}}), embedded by the image tower into the same space."""
    model: str | None = None
    input: str | list[Annotated[str | ImagePart, Field(union_mode="left_to_right")]] = Field(min_length=1, max_length=256)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None  # refused unless it is the model's width: SigLIP's features have one size
    user: str | None = None


class ClassifyRequest(Strict):
    """POST /v1/classify (a SigLIP): an image and labels in, each label's probability out."""
    model: str | None = None
    image: str  # a data URL, plain base64, or (when allowed) a file:// or http(s):// URL
    labels: str | list[str]  # "cat, dog" or ["cat", "dog"]
    template: str = "{}"


def chat_prompt(request: ChatRequest) -> tuple[str, str]:
    """(image URL, PaliGemma prompt) of a chat request: one user message with one image and some text."""
    if len(request.messages) != 1 or request.messages[0].role != "user":
        roles = [m.role for m in request.messages]
        raise UsageError(f"messages: PaliGemma answers one prompt about one image; send one user message (got {roles})")
    content = request.messages[0].content
    parts = [TextPart(type="text", text=content)] if isinstance(content, str) else content or []
    images = [p.image_url.url for p in parts if isinstance(p, ImagePart)]
    if len(images) != 1:
        raise UsageError(f"messages[0].content: needs exactly one image_url part, got {len(images)}")
    text = " ".join(p.text.strip() for p in parts if isinstance(p, TextPart) and p.text.strip())
    if not text:
        raise UsageError("messages[0].content: no text; give a PaliGemma prompt (e.g. 'caption en') or a question")
    return images[0], paligemma_prompt(text)


def paligemma_prompt(text: str) -> str:
    """The text as it is if it starts with a PaliGemma task word, else the question `answer en <text>`."""
    return text if text.split(maxsplit=1)[0].lower() in PROMPT_WORDS else f"answer en {text}"


def chat_options(request: ChatRequest, device) -> tuple[dict, list[str]]:
    """Keyword arguments of Pali.row for a chat request, and its stop strings (cut from the answer here)."""
    if request.n not in (None, 1):
        raise UsageError(f"n={request.n}: this server returns one choice per request; send n=1 (or none)")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(request, name) not in (None, 0):
            raise UsageError(f"{name}={getattr(request, name)}: not supported; leave it out or send 0")
    if request.max_tokens and request.max_completion_tokens and request.max_tokens != request.max_completion_tokens:
        raise UsageError(f"max_tokens={request.max_tokens} and max_completion_tokens={request.max_completion_tokens} "
                         "disagree; send one of them")
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stop) > 4 or not all(stop):
        raise UsageError(f"stop: up to 4 non-empty strings, got {stop!r}")
    options = {}
    if (limit := request.max_completion_tokens or request.max_tokens) is not None:
        options["max_new_tokens"] = limit
    if request.min_tokens:
        options["min_new_tokens"] = request.min_tokens
    if request.temperature:  # None or 0: greedy
        options.update(do_sample=True, temperature=request.temperature, top_p=request.top_p or 1.0,
                       top_k=request.top_k or 0)
        if request.seed is not None:
            options["generator"] = torch.Generator(device=device).manual_seed(request.seed)
    if stop:
        options["stop_strings"] = stop
    return options, stop


def task_prompt(task: str, request: TaskRequest) -> str:
    labels = [x.strip() for x in request.labels.split(";")] if isinstance(request.labels, str) else request.labels
    if not labels or not all(isinstance(x, str) and x.strip() and ";" not in x for x in labels):
        raise UsageError(f"labels: one or more non-empty labels without ';', got {request.labels!r}")
    return f"{task} " + " ; ".join(x.strip() for x in labels)


class StopCut:
    """OpenAI's stop strings: the answer ends before the first one. push() returns the text that is safe to send
    (never a part of what might become a stop string); finish() the rest, cut at the stop string."""

    def __init__(self, stop: list[str]):
        self.stop, self.text, self.sent = stop, "", 0
        self.hold = max((len(s) for s in stop), default=1) - 1

    def push(self, piece: str) -> str:
        self.text += piece
        end = self._cut()
        end = end if end < len(self.text) else max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out

    def finish(self) -> str:
        out, self.sent = self.text[self.sent:self._cut()], len(self.text)
        return out

    def _cut(self) -> int:
        return min([i for i in (self.text.find(s) for s in self.stop) if i >= 0], default=len(self.text))


# ---------------------------------------------------------------------- responses


def new_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(row) -> dict:
    return {"prompt_tokens": row.prompt_tokens, "completion_tokens": len(row.tokens),
            "total_tokens": row.prompt_tokens + len(row.tokens)}


def completion(id_: str, model: str, text: str, row, objects: dict | None = None) -> dict:
    message = {"role": "assistant", "content": text, **(objects or {})}
    return {"id": id_, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": row.finish_reason, "logprobs": None}],
            "usage": usage(row)}


def chunk(id_: str, model: str, delta: dict, finish_reason: str | None = None) -> dict:
    return {"id": id_, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}


def objects_json(objects) -> dict:
    """Detections / segmentations as JSON: boxes [x0, y0, x1, y1] in pixels of the original image (x1, y1
    exclusive), scores, and masks as base64 PNG (1-bit, the image's size); the dropped ones with reasons."""
    out = []
    for o in objects:
        item = {"label": o.label, "box": [int(v) for v in o.box], "score": round(float(o.score), 6)}
        if getattr(o, "mask", None) is not None:
            item["mask"] = _png(o.mask)
        out.append(item)
    return {"objects": out, "dropped": [{"text": d[0], "reason": d[1]} for d in objects.dropped]}


def _png(mask: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).convert("1").save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def embeddings(model: str, vectors: torch.Tensor, tokens: int, encoding: str) -> dict:
    """OpenAI's embeddings response; base64 is the float32 little-endian bytes of each vector."""
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(v.numpy().astype("<f4").tobytes()).decode("ascii") if encoding == "base64"
             else v.tolist()} for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}

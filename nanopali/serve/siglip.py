"""The contrastive model's routes, beside PaliGemma's (app.text_router): embeddings and zero-shot classification.

    POST /v1/embeddings   OpenAI's embeddings API: texts (and, an extra, image parts) -> L2-normalized vectors
    POST /v1/classify     an image and labels -> each label's probability (sigmoid for SigLIP, softmax for CLIP-style)

Both go through the zero-shot pipeline (nanopali.zero_shot.Contrastive), one request at a time on a worker
thread (a lock: the towers are small next to PaliGemma's decode, and one forward uses every core). Images are read
under the same ImagePolicy, pixel limit and errors as the chat endpoint; a text longer than the text tower's
length is cut, and the response says which in `truncated` (indices into the input).
"""

from __future__ import annotations

import threading
import time
import warnings

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from nanopali.inputs.images import load_image
from nanopali.inputs.siglip_processor import TextTruncatedWarning
from nanopali.serve import api
from nanopali.serve.errors import ServerError, as_http_errors
from nanopali.serve.images import decode_base64
from nanopali.zero_shot import parse_labels


def siglip_router(state) -> APIRouter:
    router = APIRouter()
    lock = threading.Lock()

    def read_image(url: str, field: str):
        data = (state.settings.images.read(url, field) if url.split(":", 1)[0].lower() in ("data", "file", "http", "https")
                else decode_base64(url, field))
        return load_image(data, max_pixels=state.settings.max_image_pixels)

    def run(fn):
        """fn() on the SigLIP under the lock; the indices of the texts it cut."""
        with lock, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", TextTruncatedWarning)
            result = fn()
        return result, sorted({w.message.index for w in caught if issubclass(w.category, TextTruncatedWarning)})

    @router.post("/v1/embeddings")
    async def embeddings(body: api.EmbeddingsRequest):
        clip = state.check_siglip(body.model)
        if body.dimensions is not None and body.dimensions != clip.model.config.embed_dim:
            raise ServerError(400, f"dimensions={body.dimensions}: this model's embeddings have "
                                   f"{clip.model.config.embed_dim}", param="dimensions")
        items = [body.input] if isinstance(body.input, str) else body.input
        with as_http_errors():
            images = {i: await run_in_threadpool(read_image, x.image_url.url, f"input[{i}]")
                      for i, x in enumerate(items) if isinstance(x, api.ImagePart)}
            texts = {i: x for i, x in enumerate(items) if isinstance(x, str)}

            def embed():
                import torch
                out = torch.zeros(len(items), clip.model.config.embed_dim)
                if texts:
                    out[list(texts)] = clip.embed_texts(list(texts.values()))
                if images:
                    out[list(images)] = clip.embed_images(list(images.values()))
                return out
            vectors, cut = await run_in_threadpool(run, embed)
        tokens = sum(len(clip.processor.tokenizer.encode(t)) for t in texts.values()) + len(images)
        response = api.embeddings(state.settings.siglip_name, vectors, tokens, body.encoding_format)
        return {**response, "truncated": [list(texts)[j] for j in cut]}

    @router.post("/v1/classify")
    async def classify(body: api.ClassifyRequest):
        clip = state.check_siglip(body.model)
        with as_http_errors():
            labels = parse_labels(body.labels)
            image = await run_in_threadpool(read_image, body.image, "image")
            ranked, cut = await run_in_threadpool(run, lambda: clip.classify(image, labels, template=body.template))
        return {"id": api.new_id("classify"), "object": "classification", "created": int(time.time()),
                "model": state.settings.siglip_name,
                "probability": "sigmoid" if clip.model.config.objective == "siglip" else "softmax",
                "labels": [{"label": x, "probability": p} for x, p in ranked], "truncated": [labels[j] for j in cut]}

    return router

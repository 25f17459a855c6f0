"""SigLIP, the contrastive image-text model: two towers (models/siglip.py) and a learned temperature and bias.

    image (B, 3, S, S) --vision tower + attention pooling--> image features (B, D)
    ids (B, 64)        --text tower, last position, Linear--> text features (B, D)
    logits_per_image = exp(logit_scale) * cos(image, text) + logit_bias          (N_img, N_txt)

`objective` in the config says how the logits were trained and so how they read: "siglip" (every Google SigLIP
and SigLIP 2 checkpoint) gives each (image, text) pair its own probability sigmoid(logit); "clip" (models trained
here with `--objective clip`) a softmax over the texts. Module and parameter names are those of transformers'
`SiglipModel` (`text_model.*`, `vision_model.*`, `logit_scale`, `logit_bias`), so checkpoints load with a plain
strict mapping and transformers loads what this saves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanopali.devices import resolve_device, resolve_dtype
from nanopali.errors import UsageError
from nanopali.io import hf_checkpoint
from nanopali.models.siglip import AttentionPoolingHead, SiglipAttention, SiglipTextModel, SiglipVisionModel
from nanopali.nn.contrastive import CLIP_INIT, SIGLIP_INIT, clip_loss, contrastive_logits, siglip_loss
from nanopali.nn.mlp import GeluMLP
from nanopali.siglip_config import SigLIPConfig


def lecun_normal_(weight: torch.Tensor) -> None:
    """LeCun normal as flax has it: N(0, 1/fan_in) truncated at 2 sigma, rescaled to keep that variance."""
    std = weight[0].numel() ** -0.5 / 0.87962566103423978  # the std of N(0, 1) truncated to [-2, 2]
    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


@dataclass
class SigLIPOutput:
    logits_per_image: torch.Tensor | None = None  # (N_img, N_txt)
    logits_per_text: torch.Tensor | None = None   # (N_txt, N_img)
    image_embeds: torch.Tensor | None = None      # (N_img, D), L2-normalized
    text_embeds: torch.Tensor | None = None       # (N_txt, D), L2-normalized
    loss: torch.Tensor | None = None              # with return_loss=True: the config objective's loss


class SigLIP(nn.Module):
    def __init__(self, config: SigLIPConfig):
        super().__init__()
        self.config = config
        self.text_model = SiglipTextModel(config.text_config)
        self.vision_model = SiglipVisionModel(config.vision_config)
        self.logit_scale = nn.Parameter(torch.zeros(1))  # t': the temperature is exp(t')
        self.logit_bias = nn.Parameter(torch.zeros(1))

    @torch.no_grad()
    def init_weights(self) -> "SigLIP":
        """From-scratch initialisation as big_vision (and transformers' SiglipModel) start SigLIP: embeddings
        N(0, 1/width), attention and MLP weights Xavier-uniform, other Linears and the patch Conv LeCun-normal,
        biases 0, LayerNorms identity; the temperature and bias as the objective's paper starts them
        (nn/contrastive.py). The scales matter: with GPT-2's N(0, 0.02) everywhere the pooled last position (a pad)
        hardly sees the words (different texts' features start at cosine 0.996-0.998), and a small text tower
        trained on the toy world learnt to read the text's length but never its words."""
        for m in self.modules():  # first every weight by its kind, then the layers that use other scales
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                lecun_normal_(m.weight)
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, m.embedding_dim ** -0.5)
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
            if isinstance(getattr(m, "bias", None), torch.Tensor):
                m.bias.zero_()
        for m in self.modules():
            if isinstance(m, SiglipAttention):
                xavier = [m.q_proj.weight, m.k_proj.weight, m.v_proj.weight, m.out_proj.weight]
            elif isinstance(m, GeluMLP):
                xavier = [m.fc1.weight, m.fc2.weight]
            elif isinstance(m, AttentionPoolingHead):
                xavier = [m.probe, m.attention.in_proj_weight]
                m.attention.in_proj_bias.zero_()
            else:
                continue
            for w in xavier:
                nn.init.xavier_uniform_(w)
        scale, bias = SIGLIP_INIT if self.config.objective == "siglip" else CLIP_INIT
        self.logit_scale.fill_(scale)
        self.logit_bias.fill_(bias)
        return self

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    # ---------------------------------------------------------------- features and logits

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, 3, S, S) -> pooled image features (B, D), not normalized."""
        if not torch.isfinite(pixel_values).all():
            raise UsageError("pixel_values contain NaN or infinite values; the processor's output of a real image never does")
        return self.vision_model.pooled(pixel_values)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, 64) -> text features (B, D), not normalized (see SiglipTextModel for attention_mask)."""
        return self.text_model.pooled(input_ids, attention_mask)

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """(N_img, D), (N_txt, D) -> logits_per_image (N_img, N_txt), in float32."""
        return contrastive_logits(image_features, text_features, self.logit_scale, self.logit_bias)

    def probabilities(self, logits_per_image: torch.Tensor) -> torch.Tensor:
        """What the logits mean under the trained objective: per-pair sigmoids (siglip) or a softmax over the
        texts (clip)."""
        return logits_per_image.sigmoid() if self.config.objective == "siglip" else logits_per_image.softmax(-1)

    def loss(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """The objective's loss of B matching pairs (row i of each is a positive pair)."""
        if self.config.objective == "siglip":
            return siglip_loss(image_features, text_features, self.logit_scale, self.logit_bias)
        return clip_loss(image_features, text_features, self.logit_scale)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, attention_mask: torch.Tensor | None = None,
                return_loss: bool = False, loss_fn=None) -> SigLIPOutput:
        """Logits of every image with every text; with return_loss, the loss of matching pairs (row i of each).
        `loss_fn(image_features, text_features, logit_scale, logit_bias)` replaces the one-process loss (the
        trainer passes the multi-process one of train/losses.py, which needs only this process's features)."""
        image = self.get_image_features(pixel_values)
        text = self.get_text_features(input_ids, attention_mask)
        if return_loss and image.shape[0] != text.shape[0]:
            raise UsageError(f"return_loss needs matching pairs: got {image.shape[0]} images and {text.shape[0]} texts")
        if loss_fn is not None:
            return SigLIPOutput(loss=loss_fn(image, text, self.logit_scale, self.logit_bias))
        logits = self.logits(image, text)
        return SigLIPOutput(logits_per_image=logits, logits_per_text=logits.T, image_embeds=F.normalize(image, dim=-1),
                            text_embeds=F.normalize(text, dim=-1), loss=self.loss(image, text) if return_loss else None)

    def gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute the layers of both towers in the backward pass (less memory, ~1/3 more compute)."""
        self.text_model.encoder.gradient_checkpointing = self.vision_model.encoder.gradient_checkpointing = enabled

    # ---------------------------------------------------------------- checkpoints

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | str = torch.float32,
                        device: str | torch.device = "cpu", progress: bool = False) -> "SigLIP":
        """Load a Hugging Face SiglipModel directory (config.json + safetensors), built on the meta device with the
        file tensors assigned (converted to `dtype` one at a time), in training mode like any new module."""
        device, dtype = resolve_device(device), resolve_dtype(dtype)
        path = hf_checkpoint.checkpoint_dir(path)
        config = SigLIPConfig.from_pretrained(path)
        with torch.device("meta"):
            model = cls(config)
        hf_checkpoint.load_into(model, path, dtype, device, progress)
        return model

    def save_pretrained(self, path: str | Path, max_shard_size: int | str = "5GB") -> None:
        """Write config.json and safetensors that transformers' SiglipModel and nanopali load."""
        self.config.save_pretrained(path)
        hf_checkpoint.save_state_dict(self.state_dict(), path, max_shard_size)

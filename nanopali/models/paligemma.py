"""PaliGemma: SigLIP vision tower -> linear projector -> Gemma decoder, with prefix-LM attention.

    image (B, 3, S, S) --vision--> (B, N, Dv) --projector--> (B, N, D)
    input_ids (B, T) with N `<image>` ids per image --embed--> (B, T, D), image rows replaced by the
    projector output (not scaled by sqrt(D), as in big_vision and transformers >= 5.4)
    --decoder (nn/masks.py prefix-LM mask, RoPE positions = cumulative count of attention_mask)--> logits

Module and parameter names are the Hugging Face Hub checkpoint keys (`vision_tower.vision_model.*`,
`multi_modal_projector.linear.*`, `language_model.model.*`), so loading is a plain strict load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from nanopali.config import PaliGemmaConfig
from nanopali.devices import resolve_device, resolve_dtype
from nanopali.errors import UsageError
from nanopali.io import big_vision, hf_checkpoint
from nanopali.models.gemma import GemmaDecoder
from nanopali.models.siglip import SiglipVisionModel
from nanopali.nn.losses import router_losses, suffix_loss
from nanopali.nn.masks import positions_of, prefix_lm_inputs, sequence_mask
from nanopali.nn.moe import Experts
from nanopali.nn.norms import RMSNorm
from nanopali.registry import resolve_config


@dataclass
class PaliGemmaOutput:
    logits: torch.Tensor | None = None  # (B, T, vocab_size); None when labels were given
    loss: torch.Tensor | None = None    # scalar, when labels were given: the training loss (suffix + router losses)
    # with labels and a mixture-of-experts decoder (nn/losses.router_losses): the parts of `loss`
    lm_loss: torch.Tensor | None = None        # the suffix loss alone
    balance_loss: torch.Tensor | None = None   # load-balancing loss (weighted by router_aux_loss_coef in `loss`)
    z_loss: torch.Tensor | None = None         # router z-loss (weighted by router_z_loss_coef)
    expert_counts: torch.Tensor | None = None  # (sparse layers, E) real tokens routed to each expert


class Projector(nn.Module):
    def __init__(self, config: PaliGemmaConfig):
        super().__init__()
        self.linear = nn.Linear(config.vision_config.hidden_size, config.text_config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class PaliGemma(nn.Module):
    def __init__(self, config: PaliGemmaConfig):
        super().__init__()
        self.config = config
        self.vision_tower = nn.ModuleDict({"vision_model": SiglipVisionModel(config.vision_config)})
        self.multi_modal_projector = Projector(config)
        self.language_model = nn.ModuleDict({"model": GemmaDecoder(config.text_config)})

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> "PaliGemma":
        """From-scratch initialisation (nanoGPT's): linear, conv and embedding weights and experts ~ N(0, std),
        biases 0, LayerNorm to identity, RMSNorm's stored w to 0 (Gemma's norm multiplies by 1 + w)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
                m.weight.normal_(0.0, std)
            elif isinstance(m, Experts):
                m.gate_up_proj.normal_(0.0, std), m.down_proj.normal_(0.0, std)
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
            elif isinstance(m, RMSNorm):
                m.weight.zero_()
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
        return self

    @property
    def vision(self) -> SiglipVisionModel:
        return self.vision_tower["vision_model"]

    @property
    def decoder(self) -> GemmaDecoder:
        return self.language_model["model"]

    # ---------------------------------------------------------------- forward pieces

    @property
    def device(self) -> torch.device:
        """Where the weights are: the processor's tensors go there before generating (pipeline.py, streaming.py)."""
        return self.decoder.embed_tokens.weight.device

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (I, 3, S, S) -> projected image tokens (I, N, D)."""
        return self.multi_modal_projector(self.vision(pixel_values))

    def check_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> None:
        """UsageError for token ids outside [0, vocab_size) (naming the first one and its (row, position)) or
        for pixel_values that are not all finite; one cheap pass over the inputs, once per call."""
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise UsageError(f"input_ids must be an integer tensor of token ids, got {input_ids.dtype}")
        rows = self.config.text_config.vocab_size
        outside = ((input_ids < 0) | (input_ids >= rows)) & (input_ids != self.config.image_token_index)
        if outside.any():
            where = outside.nonzero()[0].tolist()
            bad = int(input_ids[tuple(where)])
            place = f"input_ids[{', '.join(map(str, where))}]" if len(where) != 2 else f"row {where[0]}, position {where[1]}"
            more = int(outside.sum()) - 1
            raise UsageError(f"token id {bad} at {place} of input_ids is outside the vocabulary (ids 0..{rows - 1})"
                             + (f"; so are {more} more" if more else ""))
        if pixel_values is not None and not torch.isfinite(pixel_values).all():
            image = int((~torch.isfinite(pixel_values)).flatten(1).any(1).nonzero()[0, 0]) if pixel_values.ndim > 1 else 0
            raise UsageError(f"pixel_values of image {image} contain NaN or infinite values; the processor's output of "
                             "a real image never does")

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> embeddings (B, T, D), image ids replaced by image features in order
        (the inputs are checked first: `check_inputs`)."""
        self.check_inputs(input_ids, pixel_values)
        image_mask = input_ids == self.config.image_token_index                # (B, T)
        x = self.decoder.embed(input_ids.masked_fill(image_mask, 0))           # (B, T, D)
        n_image_tokens = int(image_mask.sum())
        if pixel_values is None:
            if n_image_tokens:
                raise UsageError(f"input_ids hold {n_image_tokens} <image> tokens but no pixel_values were given")
            return x
        features = self.image_features(pixel_values)                          # (I, N, D)
        if n_image_tokens != features.shape[0] * features.shape[1]:
            raise UsageError(
                f"input_ids hold {n_image_tokens} <image> tokens but pixel_values has {features.shape[0]} image(s) "
                f"of {features.shape[1]} tokens each = {features.shape[0] * features.shape[1]}")
        return x.masked_scatter(image_mask[..., None], features.to(x.dtype))

    def hidden_states(
        self,
        input_ids: torch.Tensor,                     # long (B, T)
        pixel_values: torch.Tensor | None = None,    # float (I, 3, S, S)
        attention_mask: torch.Tensor | None = None,  # (B, T), 1 = real token; default all ones
        token_type_ids: torch.Tensor | None = None,  # (B, T), 0 = prefix, 1 = suffix; default all prefix
    ) -> torch.Tensor:                               # (B, T, D) after the final norm
        attention_mask, token_type_ids = prefix_lm_inputs(input_ids, attention_mask, token_type_ids)
        x = self.embed(input_ids, pixel_values)
        masks = {w: sequence_mask(attention_mask, token_type_ids, w) for w in self.decoder.windows}
        return self.decoder(x, positions_of(attention_mask), masks)

    def forward(self, input_ids, pixel_values=None, attention_mask=None, token_type_ids=None,
                labels: torch.Tensor | None = None, router_reduce=None, router_scale: float = 1.0,
                **loss_options) -> PaliGemmaOutput:
        """Logits (B, T, V); or, with labels, only the loss (see losses.suffix_loss for loss_options).

        A mixture-of-experts decoder adds its router losses (losses.router_losses) with the config's
        coefficients, times `router_scale`. The trainer passes `router_reduce` (a sum over the data-parallel
        processes) and router_scale = processes / micro-batches, so that DDP's average of the processes' shares
        gives the gradient of the global micro-batch's router losses, averaged over the step's micro-batches."""
        h = self.hidden_states(input_ids, pixel_values, attention_mask, token_type_ids)
        if labels is None:
            return PaliGemmaOutput(logits=self.decoder.logits(h))
        loss = suffix_loss(h, labels, self.decoder.logits, **loss_options)
        t = self.config.text_config
        if not t.num_local_experts:
            return PaliGemmaOutput(loss=loss)
        balance, z, counts = router_losses(self.decoder.router_logits(), t.num_experts_per_tok, attention_mask,
                                           router_reduce)
        total = loss + router_scale * (t.router_aux_loss_coef * balance + t.router_z_loss_coef * z)
        return PaliGemmaOutput(loss=total, lm_loss=loss, balance_loss=balance, z_loss=z, expert_counts=counts)

    def gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute decoder and vision layers in the backward pass (less memory, ~1/3 more compute)."""
        self.decoder.gradient_checkpointing = self.vision.encoder.gradient_checkpointing = enabled

    # ---------------------------------------------------------------- checkpoints

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype | str = torch.float32,
        device: str | torch.device = "cpu",
        use_sliding_window: bool = True,
        progress: bool = False,
        config: PaliGemmaConfig | str | Path | None = None,
    ) -> "PaliGemma":
        """Load a Hugging Face layout checkpoint directory (config.json + safetensors), in training mode as any
        new module; or, when `path` ends in .npz, a big_vision checkpoint with `config=` (see `from_big_vision`).
        Inference speed-ups and quantization are applied afterwards (nanopali.inference.prepare).

        The model is built on the meta device and the file tensors are assigned to it, converted
        to `dtype` one at a time: no second copy of the weights is ever made.
        `use_sliding_window=False` makes every Gemma 2 layer global, as in big_vision.
        `progress=True` shows a progress bar while the tensors are read.
        `dtype` is a floating torch.dtype or its name ("bfloat16", "bf16", "float32"…); `device` is checked to be
        usable here ("cuda" needs a GPU torch sees) before any file is read (nanopali.devices).
        """
        if big_vision.is_npz(path):
            return cls.from_big_vision(path, config, dtype, device, use_sliding_window, progress)
        device, dtype = resolve_device(device), resolve_dtype(dtype)
        path = hf_checkpoint.checkpoint_dir(path)
        if config is not None:
            raise UsageError(f"config= is for big_vision .npz files; {path} is a checkpoint directory, whose "
                             "config.json gives the sizes")
        config = PaliGemmaConfig.from_pretrained(path).replace(use_sliding_window=use_sliding_window)
        with torch.device("meta"):
            model = cls(config)
        hf_checkpoint.load_into(model, path, dtype, device, progress)
        return model

    @classmethod
    def from_big_vision(
        cls,
        npz_path: str | Path,
        config: PaliGemmaConfig | str | Path,
        dtype: torch.dtype | str = torch.bfloat16,
        device: str | torch.device = "cpu",
        use_sliding_window: bool = True,
        progress: bool = False,
    ) -> "PaliGemma":
        """Load a checkpoint as Google's big_vision releases it (`paligemma-3b-pt-224.npz`,
        `paligemma2-3b-pt-448.b16.npz`…; layout and memory in nanopali/io/big_vision.py).

        The file does not say the model's sizes: `config` is a published size ("paligemma2-10b-448",
        nanopali.registry), the path of a Hugging Face config.json, or a PaliGemmaConfig. Every array is
        checked against it first. The release's 257152 embedding rows are padded with zero rows to the
        config's (257216), so `<image>` has its row. `use_sliding_window=False` reproduces big_vision, which
        has no sliding window; the default matches transformers (it only matters past 4096 tokens).
        """
        device, dtype = resolve_device(device), resolve_dtype(dtype)
        big_vision.check_file(npz_path)  # a wrong file is named before a missing config
        config = resolve_config(config).replace(use_sliding_window=use_sliding_window)
        with torch.device("meta"):
            model = cls(config)
        state = big_vision.load_state_dict(npz_path, config, dtype=dtype, device=device, progress=progress)
        model.load_state_dict(state, strict=True, assign=True)
        return model

    def save_pretrained(self, path: str | Path, max_shard_size: int | str = "5GB") -> None:
        """Write config.json and the Hub-layout safetensors that transformers and nanopali load."""
        state = self.state_dict()
        with torch.device("meta"):
            expected = type(self)(self.config).state_dict().keys()
        packed = {t.dtype for t in state.values() if not t.is_floating_point()}
        if state.keys() != expected or packed:  # int8 weights and scales, or int4 packed as uint8
            mode = "int4" if torch.uint8 in packed else "int8"
            raise ValueError(f"this model was quantized to {mode} after loading and cannot be saved in the checkpoint "
                             "layout; load the checkpoint again without quantize= and save that model")
        self.config.save_pretrained(path)
        hf_checkpoint.save_state_dict(state, path, max_shard_size)

"""The default model's recipe as resumable stages: tokenizer, VQ-VAE, data, init, warm-up, training cycles, ship.

    stage_more(Path("runs/default"))     # every stage it needs first, each skipped when its output exists

Each stage writes under the work directory and returns its output; a stage whose output is there is skipped,
so a killed run continues. scripts/make_default_model.py is the command line over STAGES.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

import nanopali
from nanopali import PaliGemma, PaliGemmaConfig, Processor, SigLIP, TextConfig, Tokenizer, VisionConfig
from nanopali.paths import DEFAULT_MODEL_DIR
from nanopali.tasks.vqvae import CHECKPOINT_NAME
from nanopali.train import TrainConfig, checkpoint, fit
from nanopali.world.eval import evaluate_world
from nanopali.world.patch_warmup import warm_up_vision
from nanopali.world.recipe.card import model_card
from nanopali.world.recipe.cycles import (
    FIRST_SCENE,
    IMAGE_SIZE,
    MORE,
    MORE_REPEAT,
    N_SCENES,
    NUM_CLASSES,
    RUNS,
    SEEDS,
    TEXT,
    TRAIN,
    VAE_SCENES,
    VAE_STEPS,
    VISION,
    WARMUP,
    WARMUP_COMMON,
    finished,
    patch_loss,
    train_options,
)
from nanopali.world.recipe.data import WorldExamples, object_masks, write_examples, write_split
from nanopali.world.tokenizer import train_world_tokenizer
from nanopali.world.vqvae import train_vae

SHIP = DEFAULT_MODEL_DIR  # where the ship stage writes the model


def stage_tokenizer(work: Path) -> Path:
    """SentencePiece on the world's text (world/tokenizer.py)."""
    out = work / "tokenizer"
    if not (out / "tokenizer.model").is_file():
        train_world_tokenizer(out, seed=SEEDS["tokenizer"])
    return out


def stage_vae(work: Path, steps: int = VAE_STEPS) -> Path:
    """The vae-oid mask VQ-VAE trained on world object masks (world/vqvae.py)."""
    out = work / CHECKPOINT_NAME
    if not out.is_file():
        start = time.perf_counter()
        vae = train_vae(object_masks(SEEDS["vae"], VAE_SCENES), steps=steps, seed=SEEDS["vae"])
        vae.save_npz(out)
        print(f"vq-vae: {steps} steps in {time.perf_counter() - start:.0f} s -> {out}")
    return out


def stage_data(work: Path, split: str = "train") -> Path:
    """A split's scenes as arrays + examples (data.write_split): WORK/data-<split>.npz."""
    out = work / f"data-{split}.npz"
    if not out.is_file():
        start = time.perf_counter()
        n = N_SCENES[split]
        count = write_split(out, SEEDS[split], FIRST_SCENE[split], n, str(stage_vae(work)), desc=f"data {split}")
        print(f"data {split}: {n} scenes, {count} examples in {time.perf_counter() - start:.0f} s -> {out}")
    return out


def _smooth_codes(n: int, dim: int) -> torch.Tensor:
    """(n, dim) unit-variance Fourier features of k / n: nearby values get similar rows."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    freqs = torch.logspace(0, math.log10(n / 4), dim // 2, dtype=torch.float64)[None]
    angles = 2 * math.pi * k / n * freqs
    return (torch.cat([angles.sin(), angles.cos()], 1) * math.sqrt(2)).float()


def smooth_locs(model: PaliGemma, tokenizer) -> PaliGemma:
    """A fresh model's <loc> embedding rows: half their random init, half a smooth code of the value they stand for."""
    with torch.no_grad():
        locs = [tokenizer.token_to_id(f"<loc{k:04d}>") for k in range(1024)]
        embed = model.decoder.embed_tokens.weight
        embed[locs] = 0.02 * (0.5 * embed[locs] / 0.02 + 0.5 * _smooth_codes(1024, embed.shape[1]))
    return model


def ship_checkpoint(source: Path, out: Path, vae: Path) -> Path:
    """`source` as a shipped model in `out` (replaced): bf16 weights, no optimizer state, tokenizer, the VQ-VAE."""
    if out.exists():
        shutil.rmtree(out)
    PaliGemma.from_pretrained(source, dtype=torch.bfloat16).save_pretrained(out)
    Processor.from_pretrained(source).save_pretrained(out)
    shutil.copy(vae, out / CHECKPOINT_NAME)
    for f in out.iterdir():
        f.chmod(0o644)  # the weights are written through a private temp file; installed copies must be readable
    return out


def stage_init(work: Path) -> Path:
    """The PaliGemma config and from-scratch weights; the <loc> embeddings start smooth in their value."""
    out = work / "init"
    if not (out / "config.json").is_file():
        tokenizer = Tokenizer.from_pretrained(stage_tokenizer(work))
        image_id = tokenizer.image_token_id
        config = PaliGemmaConfig(VisionConfig(**VISION), TextConfig(vocab_size=image_id + 1, **TEXT),
                                 image_token_index=image_id)
        torch.manual_seed(SEEDS["train"])
        model = smooth_locs(PaliGemma(config).init_weights(), tokenizer)
        model.save_pretrained(out)
        Processor(tokenizer, image_size=IMAGE_SIZE, num_image_tokens=config.num_image_tokens).save_pretrained(out)
    return out


def stage_warmup(work: Path) -> Path:
    """The vision tower alone on per-patch shape/colour/word labels (world/patch_warmup.py)."""
    out = work / "warm"
    if not (out / "config.json").is_file():
        model = PaliGemma.from_pretrained(stage_init(work))
        data = np.load(stage_data(work))
        pixels, labels = torch.from_numpy(data["images"]), torch.from_numpy(data["labels"])
        start, log = time.perf_counter(), []
        for phase in WARMUP:
            log += warm_up_vision(model.vision, pixels, labels, NUM_CLASSES, **phase, **WARMUP_COMMON)
            print(f"vision warm-up phase {phase}: last {log[-1]}")
        print(f"vision warm-up: {time.perf_counter() - start:.0f} s")
        (work / "warmup_log.json").write_text(json.dumps(log))
        model.save_pretrained(out)
        Processor.from_pretrained(stage_init(work)).save_pretrained(out)
    return out


def stage_siglip_init(work: Path, siglip: Path) -> Path:
    """The init stage's model with the vision tower of a contrastive SigLIP checkpoint (its pooling head left out), in
    place of the per-patch warm-up: PaliGemma's own recipe, a SigLIP first and then the multimodal stage."""
    out = work / "init-siglip"
    if not (out / "config.json").is_file():
        model = PaliGemma.from_pretrained(stage_init(work))
        tower = {k: v for k, v in SigLIP.from_pretrained(siglip).vision_model.state_dict().items()
                 if not k.startswith("head.")}
        model.vision.load_state_dict(tower, strict=True)  # the same tower: a shape or name difference is an error
        model.save_pretrained(out)
        Processor.from_pretrained(stage_init(work)).save_pretrained(out)
        (out / "vision_from.txt").write_text(f"{Path(siglip).resolve()}\n")
    return out


def stage_train(work: Path, vision_from: Path | None = None) -> Path:
    """The first cycle: the whole model with nanopali's trainer, checkpointed, resumable; from the warm-up's tower,
    or from a SigLIP's with `vision_from` (the make_default_model.py option --vision-from)."""
    start = stage_warmup(work) if vision_from is None else stage_siglip_init(work, vision_from)
    config = TrainConfig(model=str(start), out=str(work / "run"), resume=True, **TRAIN)
    return fit(config, train_data=WorldExamples(stage_data(work)))


def stage_more(work: Path, start: Path | None = None, vision_from: Path | None = None) -> Path:
    """The MORE cycles, each resumed or skipped when done. `start`, a checkpoint in a directory named like
    RUNS (e.g. copied from another machine), stands for its cycle: only the cycles after it are run."""
    if start is None:
        source, done = finished(work / "run", TRAIN["steps"]) or stage_train(work, vision_from), 1
    elif start.parent.name == RUNS[-1]:
        raise SystemExit(f"--start {start}: {RUNS[-1]} is the recipe's last cycle; there is no cycle after it to train")
    elif start.parent.name in RUNS and (start / "config.json").is_file():
        source, done = start, RUNS.index(start.parent.name) + 1
    else:
        raise SystemExit(f"--start {start}: not a checkpoint directory inside a run directory named one of {RUNS}")
    for run, cycle in zip(RUNS[done:], MORE[done - 1:]):
        if (last := finished(work / run, cycle["steps"])) is not None:
            source = last
            continue
        config = TrainConfig(model=str(source), out=str(work / run), resume=True, **train_options(cycle))
        auxiliary = patch_loss(cycle, source)
        data = WorldExamples(stage_data(work, cycle.get("data", "train")), cycle.get("repeat", MORE_REPEAT),
                             patch_labels=auxiliary is not None)
        source = fit(config, train_data=data, auxiliary=auxiliary)
    return source


def stage_ship(work: Path, n_eval: int = 1000) -> Path:
    """The newest checkpoint in bf16 + tokenizer + VQ-VAE into SHIP, scored on n_eval held-out scenes (every
    answer in WORK/eval-records.json), the example images, the card."""
    source = next((c for c in (checkpoint.latest(work / run) for run in reversed(RUNS)) if c is not None), None)
    if source is None:
        raise SystemExit(f"no checkpoint under {work / 'run'}: run the train stage first")
    ship_checkpoint(source, SHIP, stage_vae(work))
    write_examples()
    start = time.perf_counter()
    metrics, records = evaluate_world(nanopali.load(SHIP), n_scenes=n_eval, seed=SEEDS["eval"], size=IMAGE_SIZE,
                                      progress=True, return_records=True)
    print(f"evaluation of {n_eval} held-out scenes: {time.perf_counter() - start:.0f} s")
    (work / "eval-records.json").write_text(json.dumps(records))  # every answer, for reading the errors
    (work / "metrics.json").write_text(json.dumps({"checkpoint": str(source.relative_to(work)), **metrics}, indent=1))
    return stage_card(work)


def stage_card(work: Path) -> Path:
    """(Re)write the model card from WORK/metrics.json and WORK/limitations.md, without evaluating again."""
    metrics = json.loads((work / "metrics.json").read_text())
    source = work / metrics.pop("checkpoint")
    (SHIP / "README.md").write_text(model_card(work, source, metrics))
    return SHIP


STAGES = {"tokenizer": stage_tokenizer, "vae": stage_vae, "data": stage_data, "init": stage_init,
          "warmup": stage_warmup, "train": stage_train, "more": stage_more, "ship": stage_ship, "card": stage_card}

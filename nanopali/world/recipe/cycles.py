"""The default model's recipe in numbers: sizes, seeds, scene counts, the warm-up and the table of training cycles.

Every stage (stages.py) and the model card (card.py) read these, so the card always prints what was run.
After the first cycle (TRAIN) come further cosine cycles (MORE), each from the previous cycle's last weights
with a fresh optimizer and data order, at a lower peak lr, detection and segmentation (still improving when
the first cycle's lr had decayed) shown 3x. From cycle 4 on they are also about reading: decoder training had
worn away the tower's word features (a linear probe, scripts/probe_word_features.py), so they keep the
warm-up's per-patch labels as an auxiliary loss of weight "patch_loss" (world/patch_warmup.PatchLoss; its heads
at 10x the lr, fresh in the first such cycle, then carried over) and show OCR 6x; from cycle 6 on captions 4x.
Cycles 10 and 11 train on scenes never shown before ("data": a split of N_SCENES), because after nine cycles
on the same scenes the model was memorizing them. "note" says where a cycle ran when not here (the card prints it).
"""

from __future__ import annotations

from pathlib import Path

import torch

from nanopali.train import checkpoint
from nanopali.world.patch_warmup import PatchLoss
from nanopali.world.scenes import COLORS, SHAPES, WORDS

IMAGE_SIZE = 128
PATCH_SIZE = 16
GRID = IMAGE_SIZE // PATCH_SIZE
VISION = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
              image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
TEXT = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=1, head_dim=64, max_position_embeddings=512)

# Seeds of each stage's world draws; "fresh" and "fresh2" are later scenes of the training seed (cycles 10 and 11).
SEEDS = {"tokenizer": 0, "vae": 1, "train": 2, "fresh": 2, "fresh2": 2, "eval": 3}
N_SCENES = {"train": 30000, "fresh": 60000, "fresh2": 60000}
FIRST_SCENE = {"train": 0, "fresh": 30000, "fresh2": 90000}  # the training seed's next scenes, for cycles 10 and 11
VAE_SCENES, VAE_STEPS = 8000, 2500  # the mask VQ-VAE: scenes whose object masks it learns, training steps

# The first training cycle (the train stage); the later ones (MORE) start from its options.
TRAIN = dict(steps=5000, batch_size=32, lr=6e-4, lr_scale={"vision_tower.*": 0.5}, warmup_steps=300,
             min_lr_ratio=0.05, weight_decay=0.01, bf16=True, save_every=250, keep_checkpoints=2,
             log_every=10, seed=2)

# The vision warm-up on per-patch labels (world/patch_warmup.py): two cosine cycles, fresh heads each.
NUM_CLASSES = (1 + len(SHAPES), 1 + len(COLORS), 1 + len(WORDS))  # scenes.patch_labels' groups, 0 = background
WARMUP = [dict(steps=1500, lr=1e-3), dict(steps=2500, lr=1e-3)]
WARMUP_COMMON = dict(batch_size=32, background_weight=0.1, seed=SEEDS["train"])

# The held-out scores the model card compares against (world/eval.py's metric names).
TARGETS = {"vqa/how many": 0.95, "vqa/what color": 0.95, "vqa/what shape": 0.95, "vqa/where": 0.95,
           "caption/exact_match": 0.80, "detect/map50": 0.90, "segment/miou": 0.75, "ocr/exact_match": 0.90}

# The later cycles (see the module docstring).
REPEAT = {"caption": 2, "detect": 2, "segment": 2, "ocr": 2}  # per epoch; the short VQA answers once
MORE_REPEAT = {**REPEAT, "detect": 3, "segment": 3}
READ = {"patch_loss": 0.5, "lr_scale": {**TRAIN["lr_scale"], "auxiliary.*": 10.0}, "repeat": {**MORE_REPEAT, "ocr": 6}}
READ_CAPTIONS = {**READ, "repeat": {**READ["repeat"], "caption": 4}, "warmup_steps": 100}
READ_CAPTIONS_6X = {**READ_CAPTIONS, "repeat": {**READ_CAPTIONS["repeat"], "caption": 6}}
RECIPE_ONLY = ("patch_loss", "repeat", "data", "note")  # cycle keys that are not TrainConfig options
MORE = [{**TRAIN, "steps": 4000, "lr": 3e-4, "warmup_steps": 100, "seed": 3},
        {**TRAIN, "steps": 3000, "lr": 1.5e-4, "warmup_steps": 100, "seed": 4},
        {**TRAIN, **READ, "steps": 4000, "lr": 3e-4, "warmup_steps": 100, "seed": 5},
        {**TRAIN, **READ, "steps": 2500, "lr": 1.5e-4, "warmup_steps": 100, "seed": 6},
        {**TRAIN, **READ_CAPTIONS, "steps": 8000, "lr": 2e-4, "seed": 7,
         "note": "trained on an H100 (the device tool), from cycle 5's weights as shipped (rounded to bf16: "
                 "the fp32 checkpoint was over the transfer limit) and its auxiliary heads"},
        {**TRAIN, **READ_CAPTIONS, "steps": 5000, "lr": 1.2e-4, "seed": 8,
         "note": "on an H100 as cycle 6, from cycle 6's weights as shipped"},
        {**TRAIN, **READ_CAPTIONS, "steps": 2500, "lr": 8e-5, "seed": 9,
         "note": "back on the 2-core CPU, from cycle 7's fp32 checkpoint"},
        {**TRAIN, **READ_CAPTIONS_6X, "steps": 5000, "lr": 1e-4,
         "seed": 10, "note": "on a 2-core Intel Xeon (AMX), from cycle 8's weights as shipped (bf16) and fresh "
                             "auxiliary heads (cycle 8's were not kept)"},
        {**TRAIN, **READ_CAPTIONS_6X, "steps": 4000, "lr": 1.2e-4,
         "seed": 11, "data": "fresh", "note": "on the 2-core Xeon; after nine cycles on the same 30000 "
                                               "scenes the model captioned 96 % of those but 77-81 % of new ones"},
        {**TRAIN, **READ_CAPTIONS_6X, "steps": 4000, "lr": 8e-5,
         "seed": 12, "data": "fresh2", "note": "on the 2-core Xeon"}]
RUNS = ["run"] + [f"run{k}" for k in range(2, 2 + len(MORE))]  # the cycles' run directories, in order


def train_options(cycle: dict) -> dict:
    """A cycle's TrainConfig options: its entries less the recipe's own (RECIPE_ONLY)."""
    return {k: v for k, v in cycle.items() if k not in RECIPE_ONLY}


def finished(run: Path, steps: int) -> Path | None:
    """The newest checkpoint of a run directory when it has reached `steps`, else None."""
    last = checkpoint.latest(run)
    return last if last is not None and int(last.name.rsplit("-", 1)[1]) >= steps else None


def patch_loss(cycle: dict, source: Path) -> PatchLoss | None:
    """A cycle's auxiliary PatchLoss, None without "patch_loss": the heads the checkpoint `source` was trained
    with when its trainer state has them (the previous reading cycle's), else fresh ones seeded by the cycle
    (also for shipped weights, which have no trainer state)."""
    if not cycle.get("patch_loss"):
        return None
    torch.manual_seed(cycle["seed"])
    auxiliary = PatchLoss(VISION["hidden_size"], NUM_CLASSES, WARMUP_COMMON["background_weight"], cycle["patch_loss"])
    state = checkpoint.load_state(source) if (source / checkpoint.STATE_FILE).is_file() else {}  # shipped weights: none
    if (saved := state.get("auxiliary")) is not None:
        auxiliary.load_state_dict(saved["module"])
    return auxiliary

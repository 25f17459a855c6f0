"""Reproduce nanopali's shipped default model from seeds: tokenizer, mask VQ-VAE, data, training, model card.

    python scripts/make_default_model.py --work runs/default            # every stage, resumable
    python scripts/make_default_model.py --work runs/default --stage vae  # one stage

Stages (each writes under --work and is skipped when its output exists, so a killed run continues):
    tokenizer   SentencePiece on the world's text (nanopali/world_tokenizer.py)
    vae         the vae-oid VQ-VAE trained on world object masks (nanopali/train/vqvae.py)
    data        the training scenes as arrays + examples (nanopali/world.py), VQA "how many" thinned; the
                "fresh" splits (later scenes of the same seed, for the last cycles) are made when first needed
    init        the PaliGemma config and from-scratch weights (loc-token embeddings start smooth in the value)
    warmup      the vision tower alone on per-patch shape/colour/word labels (nanopali/train/patch_warmup.py),
                background patches weighed down
    train       the whole model with nanopali's trainer (nanopali/train/loop.py fit), checkpointed, resumable
    more        further, lower cosine cycles of the trainer, each from the last one's weights (WORK/run2, ...);
                the last five with the per-patch labels as an auxiliary loss (train/patch_warmup.PatchLoss);
                `--start DIR` continues after a checkpoint copied from another machine
    ship        the newest checkpoint in bf16 + tokenizer + VQ-VAE into nanopali/default_model/, scored on
                1000 held-out scenes (nanopali/world_eval.py, seed 3; every answer in WORK/eval-records.json),
                examples/world-*.png (seed 5), the card
    card        the model card README.md from WORK/metrics.json and WORK/limitations.md (no evaluation)

Wall time per stage accumulates in WORK/times.json (a resumed stage adds to its entry).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from collections.abc import Sequence
from multiprocessing import Pool

from PIL import Image

from nanopali import PaliGemma, PaliGemmaConfig, Processor, TextConfig, Tokenizer, VisionConfig
from nanopali.tasks import SegmentationVAE
from nanopali.tasks.segmentation import CHECKPOINT_NAME, crop_to_64
from nanopali.train import TrainConfig, fit
from nanopali.world import COLORS, SHAPES, WORDS, _normalized, examples, make_scene, patch_labels
from nanopali.world_tokenizer import train_world_tokenizer

IMAGE_SIZE = 128
PATCH_SIZE = 16
GRID = IMAGE_SIZE // PATCH_SIZE
VISION = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
              image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
TEXT = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=1, head_dim=64, max_position_embeddings=512)
N_SCENES = {"train": 30000, "fresh": 60000, "fresh2": 60000}
FIRST_SCENE = {"train": 0, "fresh": 30000, "fresh2": 90000}  # the training seed's next scenes, for cycles 10 and 11
TRAIN = dict(steps=5000, batch_size=32, lr=6e-4, lr_scale={"vision_tower.*": 0.5}, warmup_steps=300,
             min_lr_ratio=0.05, weight_decay=0.01, bf16=True, save_every=250, keep_checkpoints=2,
             log_every=10, seed=2)
SEEDS = {"tokenizer": 0, "vae": 1, "train": 2, "fresh": 2, "fresh2": 2, "eval": 3}


def stage_tokenizer(work: Path) -> Path:
    out = work / "tokenizer"
    if not (out / "tokenizer.model").is_file():
        train_world_tokenizer(out, seed=SEEDS["tokenizer"])
    return out


def object_masks(seed: int, n_scenes: int) -> np.ndarray:
    """float32 (N, 64, 64): every object's visible mask, cropped to its box and resized as the seg encoder does."""
    r = random.Random(f"vae:{seed}")
    masks = []
    for _ in range(n_scenes):
        scene = make_scene(r, size=IMAGE_SIZE)
        masks += [crop_to_64(o.mask, _normalized(o.box, scene.size)) for o in scene.objects]
    return np.stack(masks)


def stage_vae(work: Path, steps: int = 2500) -> Path:
    out = work / CHECKPOINT_NAME
    if not out.is_file():
        from nanopali.train.vqvae import train_vae
        start = time.perf_counter()
        vae = train_vae(object_masks(SEEDS["vae"], 8000), steps=steps, seed=SEEDS["vae"])
        vae.save_npz(out)
        print(f"vq-vae: {steps} steps in {time.perf_counter() - start:.0f} s -> {out}")
    return out


def _scene_chunk(args) -> tuple[np.ndarray, np.ndarray, list]:
    """Scenes start..stop of a seed: images uint8 (n, S, S, 3), patch labels (n, P, 3), examples (scene, prefix, suffix)."""
    seed, start, stop, vae_path = args
    torch.set_num_threads(1)  # one process per core: torch's own threads would fight over the cores
    vae = SegmentationVAE.from_npz(vae_path)
    images, labels, rows = [], [], []
    for i in range(start, stop):
        rng = random.Random(f"world:{seed}:{i}")  # scripts/make_world_data.py's convention
        scene = make_scene(rng, size=IMAGE_SIZE)
        images.append(np.asarray(scene.image))
        labels.append(patch_labels(scene, GRID))
        exs = examples(scene, rng, vae)
        counts = [e for e in exs if e["prefix"].startswith("answer en how many ") and "shapes" not in e["prefix"]]
        keep = rng.choice(counts) if counts else None  # one "how many <shape>" per scene besides "how many shapes"
        rows += [(i, e["prefix"], e["suffix"]) for e in exs if e not in counts or e is keep]
    return np.stack(images), np.stack(labels), rows


def stage_data(work: Path, split: str = "train") -> Path:
    out = work / f"data-{split}.npz"
    if not out.is_file():
        start = time.perf_counter()
        first, n, vae = FIRST_SCENE[split], N_SCENES[split], str(stage_vae(work))
        chunks = [(SEEDS[split], a, min(a + 1000, first + n), vae) for a in range(first, first + n, 1000)]
        with Pool(os.cpu_count() or 2) as pool:  # the chunks are seeded by their scene numbers: any pool size
            parts = list(tqdm(pool.imap(_scene_chunk, chunks), total=len(chunks), desc=f"data {split}"))
        rows = [(i - first, prefix, suffix) for _, _, chunk in parts for i, prefix, suffix in chunk]  # rows index images
        np.savez(out, images=np.concatenate([p[0] for p in parts]), labels=np.concatenate([p[1] for p in parts]),
                 scene=np.array([r[0] for r in rows]), prefix=np.array([r[1] for r in rows]),
                 suffix=np.array([r[2] for r in rows]))
        print(f"data {split}: {n} scenes, {len(rows)} examples in {time.perf_counter() - start:.0f} s -> {out}")
    return out


REPEAT = {"caption": 2, "detect": 2, "segment": 2, "ocr": 2}  # per epoch; the short VQA answers once


class WorldExamples(Sequence):
    """The examples of a data-*.npz as the trainer's {"image", "prefix", "suffix"} items, those of the
    long-answer tasks listed REPEAT[task] times per epoch; with `patch_labels=True` each item also carries
    its scene's per-patch labels (P, 3) under "patch_labels", for the trainer's auxiliary PatchLoss."""

    def __init__(self, path: Path, repeat: dict[str, int] | None = None, patch_labels: bool = False):
        data = np.load(path)
        self.images, self.scene = data["images"], data["scene"]
        self.labels = data["labels"] if patch_labels else None
        self.prefix, self.suffix = data["prefix"].tolist(), data["suffix"].tolist()
        repeat = REPEAT if repeat is None else repeat
        self.index = [i for i, prefix in enumerate(self.prefix) for _ in range(repeat.get(prefix.split()[0], 1))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k):
        i = self.index[k]
        item = {"image": Image.fromarray(self.images[self.scene[i]]), "prefix": self.prefix[i], "suffix": self.suffix[i]}
        if self.labels is not None:
            item["patch_labels"] = self.labels[self.scene[i]]
        return item


def _smooth_codes(n: int, dim: int) -> torch.Tensor:
    """(n, dim) unit-variance Fourier features of k / n: nearby values get similar rows."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    freqs = torch.logspace(0, math.log10(n / 4), dim // 2, dtype=torch.float64)[None]
    angles = 2 * math.pi * k / n * freqs
    return (torch.cat([angles.sin(), angles.cos()], 1) * math.sqrt(2)).float()


def stage_init(work: Path) -> Path:
    out = work / "init"
    if not (out / "config.json").is_file():
        tokenizer = Tokenizer.from_pretrained(stage_tokenizer(work))
        image_id = tokenizer.image_token_id
        config = PaliGemmaConfig(VisionConfig(**VISION), TextConfig(vocab_size=image_id + 1, **TEXT),
                                 image_token_index=image_id)
        torch.manual_seed(SEEDS["train"])
        model = PaliGemma(config).init_weights()
        with torch.no_grad():  # <loc> rows: half random, half a smooth code of the value they stand for
            locs = [tokenizer.token_to_id(f"<loc{k:04d}>") for k in range(1024)]
            embed = model.decoder.embed_tokens.weight
            embed[locs] = 0.02 * (0.5 * embed[locs] / 0.02 + 0.5 * _smooth_codes(1024, embed.shape[1]))
        model.save_pretrained(out)
        Processor(tokenizer, image_size=IMAGE_SIZE, num_image_tokens=config.num_image_tokens).save_pretrained(out)
    return out


NUM_CLASSES = (1 + len(SHAPES), 1 + len(COLORS), 1 + len(WORDS))  # world.patch_labels' groups, 0 = background
WARMUP = [dict(steps=1500, lr=1e-3), dict(steps=2500, lr=1e-3)]  # two cosine cycles, fresh heads each
WARMUP_COMMON = dict(batch_size=32, background_weight=0.1, seed=SEEDS["train"])


def stage_warmup(work: Path) -> Path:
    out = work / "warm"
    if not (out / "config.json").is_file():
        from nanopali.train.patch_warmup import warm_up_vision
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


def stage_train(work: Path) -> Path:
    config = TrainConfig(model=str(stage_warmup(work)), out=str(work / "run"), resume=True, **TRAIN)
    return fit(config, train_data=WorldExamples(stage_data(work)))


# Further cosine cycles, each from the previous cycle's last weights with a fresh optimizer and data order, at a
# lower peak lr, detection and segmentation (still improving when the first cycle's lr had decayed) shown 3x.
# From cycle 4 on they are also about reading: decoder training had worn away the tower's word features (a linear
# probe, scripts/probe_word_features.py: 73 % after the warm-up, 30 % after cycle 3), so they keep the warm-up's
# per-patch labels as an auxiliary loss of weight "patch_loss" (train/patch_warmup.PatchLoss; its heads at 10x the
# lr, fresh in the first such cycle, then carried over) and show OCR 6x; from cycle 6 on captions 4x. Cycles 10
# and 11 train on scenes never shown before ("data": a split of N_SCENES): after nine cycles on the same 30000
# scenes the model captioned 96 % of those and 77-81 % of new ones, so it was memorizing. "note" says
# where a cycle ran when not here (the model card prints it).
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


def _finished(run: Path, steps: int) -> Path | None:
    from nanopali.train.checkpoint import latest
    last = latest(run)
    return last if last is not None and int(last.name.rsplit("-", 1)[1]) >= steps else None


def patch_loss(cycle: dict, source: Path):
    """A cycle's auxiliary PatchLoss, None without "patch_loss": the heads the checkpoint `source` was trained
    with when its trainer state has them (the previous reading cycle's), else fresh ones seeded by the cycle
    (also for shipped weights, which have no trainer state)."""
    from nanopali.train import checkpoint
    from nanopali.train.patch_warmup import PatchLoss
    if not cycle.get("patch_loss"):
        return None
    torch.manual_seed(cycle["seed"])
    auxiliary = PatchLoss(VISION["hidden_size"], NUM_CLASSES, WARMUP_COMMON["background_weight"], cycle["patch_loss"])
    state = checkpoint.load_state(source) if (source / checkpoint.STATE_FILE).is_file() else {}  # shipped weights: none
    if (saved := state.get("auxiliary")) is not None:
        auxiliary.load_state_dict(saved["module"])
    return auxiliary


def stage_more(work: Path, start: Path | None = None) -> Path:
    """The MORE cycles, each resumed or skipped when done. `start`, a checkpoint in a directory named like
    RUNS (e.g. copied from another machine), stands for its cycle: only the cycles after it are run."""
    if start is None:
        source, done = _finished(work / "run", TRAIN["steps"]) or stage_train(work), 1
    elif start.parent.name == RUNS[-1]:
        raise SystemExit(f"--start {start}: {RUNS[-1]} is the recipe's last cycle; there is no cycle after it to train")
    elif start.parent.name in RUNS and (start / "config.json").is_file():
        source, done = start, RUNS.index(start.parent.name) + 1
    else:
        raise SystemExit(f"--start {start}: not a checkpoint directory inside a run directory named one of {RUNS}")
    for run, cycle in zip(RUNS[done:], MORE[done - 1:]):
        if (finished := _finished(work / run, cycle["steps"])) is not None:
            source = finished
            continue
        options = {k: v for k, v in cycle.items() if k not in RECIPE_ONLY}
        config = TrainConfig(model=str(source), out=str(work / run), resume=True, **options)
        auxiliary = patch_loss(cycle, source)
        data = WorldExamples(stage_data(work, cycle.get("data", "train")), cycle.get("repeat", MORE_REPEAT),
                             patch_labels=auxiliary is not None)
        source = fit(config, train_data=data, auxiliary=auxiliary)
    return source


TARGETS = {"vqa/how many": 0.95, "vqa/what color": 0.95, "vqa/what shape": 0.95, "vqa/where": 0.95,
           "caption/exact_match": 0.80, "detect/map50": 0.90, "segment/miou": 0.75, "ocr/exact_match": 0.90}
SHIP = Path(__file__).resolve().parents[1] / "nanopali" / "default_model"


def stage_ship(work: Path, n_eval: int = 1000) -> Path:
    import shutil

    import nanopali
    from nanopali.train.checkpoint import latest
    from nanopali.world_eval import evaluate_world
    source = next((c for c in (latest(work / run) for run in reversed(RUNS)) if c is not None), None)  # the last cycle's
    if source is None:
        raise SystemExit(f"no checkpoint under {work / 'run'}: run the train stage first")
    if SHIP.exists():
        shutil.rmtree(SHIP)
    PaliGemma.from_pretrained(source, dtype=torch.bfloat16).save_pretrained(SHIP)
    Processor.from_pretrained(source).save_pretrained(SHIP)
    shutil.copy(stage_vae(work), SHIP / CHECKPOINT_NAME)
    for f in SHIP.iterdir():
        f.chmod(0o644)  # the weights are written through a private temp file; installed copies must be readable
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


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def write_examples(n: int = 6) -> None:
    """examples/world-<i>.png: scenes of a seed used nowhere else (5), the first n with a word and 2+ objects."""
    EXAMPLES.mkdir(exist_ok=True)
    found, i = 0, 0
    while found < n:
        scene = make_scene(random.Random(f"world:5:{i}"), size=IMAGE_SIZE)
        i += 1
        if scene.word and len(scene.objects) >= 2:
            scene.image.save(EXAMPLES / f"world-{found}.png")
            found += 1


def warmup_accuracy(work: Path, last: int = 5) -> str:
    """The warm-up's accuracy on object/word patches, averaged over its last `last` log entries."""
    path = work / "warmup_log.json"
    if not path.is_file():
        return "not logged"
    log = [r for r in json.loads(path.read_text()) if "labelled_accuracy" in r][-last:]
    if not log:
        return "not logged"
    acc = np.nanmean([r["labelled_accuracy"] for r in log], axis=0)
    return ", ".join(f"{name} {100 * a:.0f} %" for name, a in zip(("shape", "colour", "word"), acc))


def _cycle_line(k: int, cycle: dict) -> str:
    """The card's list item for MORE[k]."""
    repeat = cycle.get("repeat", MORE_REPEAT)
    shown = ", ".join(f"{task} {n}x" for task, n in repeat.items() if n != REPEAT.get(task, 1))
    aux = (f", plus the vision warm-up's per-patch labels as an auxiliary loss of weight {cycle['patch_loss']} "
           f"(nanopali/train/patch_warmup.PatchLoss)" if cycle.get("patch_loss") else "")
    changed = {key: v for key, v in cycle.items() if key not in RECIPE_ONLY and v != TRAIN.get(key)}
    note = f"; {cycle['note']}" if cycle.get("note") else ""
    split = cycle.get("data", "train")
    data = (f", on the data stage's \"{split}\" split (scenes {FIRST_SCENE[split]}-{FIRST_SCENE[split] + N_SCENES[split] - 1} "
            f"of the training seed, none seen by an earlier cycle)" if split != "train" else "")
    return (f"{7 + k}. **Cycle {2 + k}**: {cycle['steps']} more steps from the previous cycle's last weights, a fresh "
            f"optimizer and data order{data}, per epoch {shown} (instead of 2x){aux}: `{json.dumps(changed)}` "
            f"(the rest as above){note}.\n")


def model_card(work: Path, source: Path, metrics: dict) -> str:
    """The model card: what the model is, how it was made, and its held-out scores against the targets."""
    template = (Path(__file__).parent / "default_model_card.md").read_text()
    rows = []
    for key, target in TARGETS.items():
        value = metrics.get(key)
        shown = "n/a" if value is None else f"{100 * value:.1f} %" if key != "detect/map50" else f"{value:.3f}"
        wanted = f"{100 * target:.0f} %" if key != "detect/map50" else f"{target:.2f}"
        met = "n/a" if value is None else "yes" if value >= target else "**no**"
        rows.append(f"| {key} | {shown} | {wanted} | {met} | {metrics.get('n/' + key.split('/')[0] if not key.startswith('vqa') else 'n/' + key, '')} |")
    times = json.loads((work / "times.json").read_text()) if (work / "times.json").is_file() else {}
    params = sum(t.numel() for t in PaliGemma.from_pretrained(source).parameters())
    more = "".join(_cycle_line(k, cycle) for k, cycle in enumerate(MORE[:RUNS.index(source.parent.name)]))
    return template.format(
        metrics_table="\n".join(rows), params=f"{params / 1e6:.1f}", steps=TRAIN["steps"], more=more,
        times=", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()), train=json.dumps(TRAIN),
        vision=json.dumps(VISION), text=json.dumps(TEXT), n_scenes=N_SCENES["train"],
        vocab=PaliGemmaConfig.from_pretrained(source).text_config.vocab_size, mb=f"{2 * params / 2**20:.0f}",
        warmup=json.dumps([{**phase, **WARMUP_COMMON} for phase in WARMUP]), warmup_acc=warmup_accuracy(work),
        limitations=(work / "limitations.md").read_text() if (work / "limitations.md").is_file() else "Not assessed yet.")


STAGES = {"tokenizer": stage_tokenizer, "vae": stage_vae, "data": stage_data, "init": stage_init,
          "warmup": stage_warmup, "train": stage_train, "more": stage_more, "ship": stage_ship, "card": stage_card}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("runs/default"))
    p.add_argument("--stage", choices=list(STAGES), action="append", help="run only these stages (default: all)")
    p.add_argument("--start", type=Path, help="more: continue after this checkpoint (in a run directory named like "
                                              "WORK's, e.g. run5/checkpoint-002500) instead of WORK's own cycles")
    args = p.parse_args(argv)
    if args.start and args.stage != ["more"]:
        p.error("--start continues the more stage alone: add --stage more (and no other stage)")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    args.work.mkdir(parents=True, exist_ok=True)
    times_file = args.work / "times.json"
    for name in args.stage or [s for s in STAGES if s != "card"]:  # ship writes the card
        start = time.perf_counter()
        STAGES[name](args.work, **({"start": args.start} if name == "more" else {}))
        times = json.loads(times_file.read_text()) if times_file.is_file() else {}
        times[name] = times.get(name, 0.0) + time.perf_counter() - start
        times_file.write_text(json.dumps(times))


if __name__ == "__main__":
    main()

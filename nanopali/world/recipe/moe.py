"""Mixture-of-experts PaliGemmas trained on the shapes world, against the dense model (issue #22).

    python scripts/make_moe_model.py --work runs/moe            # every stage below, each resumable

Two comparisons, each a dense run and a mixture-of-experts run of nanopali's trainer that see the same
examples in the same order for the same steps, with the same options (only the decoder's MLPs differ):

    scratch   from the same init: the shipped model's vision tower and projector, a fresh decoder drawn from
              one seed (embeddings with the smooth <loc> code, attention, norms: identical in both; the MLPs:
              dense GeGLU of width 1024 vs 8 experts of width 512, top-2, a router), the first cycle's recipe.
              The MoE's active MLP parameters and FLOPs per token equal the dense model's (2 x 512 = 1024);
              it holds 4x the MLP parameters.
    upcycle   from the shipped default model: trained further as it is, vs upcycled to 8 copies of each MLP
              with top-2 routing (train/upcycle.py: its logits start equal to the dense model's; active MLP
              FLOPs per token 2x the dense model's), with the last cycle's recipe (captions 6x, OCR 6x, the
              per-patch auxiliary loss) on scenes no earlier cycle saw.

Each run is scored on SCORE_SCENES fresh scenes of a world seed used nowhere else (SEEDS["score"]) with all
eight metrics of the default model (world/eval.py). Both runs of a pair answer the same examples, so they are
compared example by example (`paired`): per task, the examples where one run scores higher than the other,
and a two-sided sign test over them. Decided before the scores were seen: an MoE is shipped (the ship stage,
to nanopali/world/moe_model, `nanopali caption --model moe ...`) only if it beats its dense twin at p < 0.05
on captions or on all VQA questions together, and is worse at p < 0.05 on no task. None ships: BENCHMARKS.md,
"Mixture of experts", has the results and why.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import nanopali
from nanopali import PaliGemma, Processor
from nanopali.paths import DEFAULT_MODEL_DIR, MOE_MODEL_DIR
from nanopali.tasks.vqvae import CHECKPOINT_NAME
from nanopali.train import TrainConfig, fit
from nanopali.train.upcycle import upcycle
from nanopali.world.eval import evaluate_world
from nanopali.world.recipe.cycles import IMAGE_SIZE, MORE, TRAIN, finished, patch_loss, train_options
from nanopali.world.recipe.data import WorldExamples, write_split
from nanopali.world.recipe.stages import ship_checkpoint, smooth_locs

SEEDS = {"data": 2, "init": 22, "score": 17}       # world seed of the new scenes (the training seed), init, scores
NEW_SCENES = (150000, 20000)                        # scenes 150000-169999 of the training seed: no cycle saw them
SCORE_SCENES = 1000
MOE = dict(num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.01)
SCRATCH_MOE = dict(MOE, moe_intermediate_size=512)  # 2 active experts of 512 = the dense MLP's 1024
SCRATCH = {**TRAIN, "steps": 300, "warmup_steps": 30, "save_every": 50, "seed": SEEDS["init"]}  # cycle 1's, shorter
UPCYCLE = {**MORE[-1], "steps": 250, "warmup_steps": 25, "save_every": 50, "seed": 13, "data": "new",
           "note": "from the shipped default model (bf16 weights), fresh auxiliary heads"}
RUNS = {"scratch-dense": ("init-dense", SCRATCH), "scratch-moe": ("init-moe", SCRATCH),
        "upcycle-dense": ("init-shipped", UPCYCLE), "upcycle-moe": ("init-upcycled", UPCYCLE)}


def stage_data(work: Path) -> Path:
    """The new scenes with their examples (recipe/data.write_split): WORK/data-new.npz."""
    out = work / "data-new.npz"
    if not out.is_file():
        first, n = NEW_SCENES
        write_split(out, SEEDS["data"], first, n, str(DEFAULT_MODEL_DIR / CHECKPOINT_NAME), desc="data new")
    return out


def _save(model: PaliGemma, out: Path) -> Path:
    model.save_pretrained(out)
    Processor.from_pretrained(DEFAULT_MODEL_DIR).save_pretrained(out)
    shutil.copy(DEFAULT_MODEL_DIR / CHECKPOINT_NAME, out / CHECKPOINT_NAME)
    return out


def stage_init(work: Path) -> dict[str, Path]:
    """The four starting checkpoints (fp32): scratch dense and MoE (one seed; see the module docstring), the
    shipped model and its upcycled twin."""
    shipped = PaliGemma.from_pretrained(DEFAULT_MODEL_DIR)
    paths = {name: work / name for name in ("init-dense", "init-moe", "init-shipped", "init-upcycled")}
    if not (paths["init-dense"] / "config.json").is_file():
        tokenizer = Processor.from_pretrained(DEFAULT_MODEL_DIR).tokenizer
        models = {}
        for name, text in (("init-dense", {}), ("init-moe", SCRATCH_MOE)):
            torch.manual_seed(SEEDS["init"])
            config = replace(shipped.config, text_config=replace(shipped.config.text_config, **text))
            models[name] = smooth_locs(PaliGemma(config).init_weights(), tokenizer)
        shared = {k: v for k, v in models["init-dense"].state_dict().items() if ".mlp." not in k}  # decoder, but MLPs
        shared.update({k: v for k, v in shipped.state_dict().items()
                       if k.startswith(("vision_tower.", "multi_modal_projector."))})
        for name, model in models.items():
            model.load_state_dict({**model.state_dict(), **shared}, strict=True)
            _save(model, paths[name])
    if not (paths["init-upcycled"] / "config.json").is_file():
        _save(shipped, paths["init-shipped"])
        _save(upcycle(shipped, MOE["num_local_experts"], MOE["num_experts_per_tok"],
                      aux_loss_coef=MOE["router_aux_loss_coef"], seed=SEEDS["init"]), paths["init-upcycled"])
    return paths


def stage_train(work: Path, run: str) -> Path:
    """One run of RUNS, resumable (the trainer's own --resume)."""
    start, recipe = RUNS[run]
    if (last := finished(work / run, recipe["steps"])) is not None:
        return last
    source = stage_init(work)[start]
    auxiliary = patch_loss(recipe, source)
    data = WorldExamples(stage_data(work), recipe.get("repeat"), patch_labels=auxiliary is not None)
    config = TrainConfig(model=str(source), out=str(work / run), resume=True, **train_options(recipe))
    return fit(config, train_data=data, auxiliary=auxiliary)


def stage_score(work: Path, run: str) -> dict:
    """World metrics of a run's last checkpoint on SCORE_SCENES scenes of SEEDS["score"] (WORK/scores.json; every
    answer in WORK/records-<run>.json)."""
    file = work / "scores.json"
    scores = json.loads(file.read_text()) if file.is_file() else {}
    if run not in scores:
        source = finished(work / run, RUNS[run][1]["steps"])
        if source is None:
            raise SystemExit(f"{run} has not finished training: run its train stage first")
        start = time.perf_counter()
        pali = nanopali.load(source, vae=DEFAULT_MODEL_DIR / CHECKPOINT_NAME)  # checkpoints carry no VQ-VAE
        metrics, records = evaluate_world(pali, n_scenes=SCORE_SCENES, seed=SEEDS["score"], size=IMAGE_SIZE,
                                          return_records=True)
        (work / f"records-{run}.json").write_text(json.dumps(records))  # every answer: paired comparisons
        scores = json.loads(file.read_text()) if file.is_file() else {}  # another run may have written meanwhile
        scores[run] = {"checkpoint": str(source.relative_to(work)), "seconds": time.perf_counter() - start, **metrics}
        file.write_text(json.dumps(scores, indent=1))
    return scores[run]


def expert_load(work: Path, run: str, steps: int = 100) -> list[float]:
    """Per sparse layer: the busiest expert's tokens / the mean over the experts, over the run's last `steps`
    steps (metrics.jsonl's expert_counts; 1.0 = perfectly balanced)."""
    rows = [r for r in map(json.loads, (work / run / "metrics.jsonl").read_text().splitlines()) if "expert_counts" in r]
    counts = np.sum([r["expert_counts"] for r in rows if r["step"] > rows[-1]["step"] - steps], axis=0)  # (L, E)
    return [float(c.max() / c.mean()) for c in counts]


def comparison(work: Path) -> str:
    """The results as a markdown table: per run its held-out scores (every metric of cycles.TARGETS), parameters
    (total / active per token), the expert load over its last 100 steps and its training examples/s (median
    of its log lines; a shared machine's, so only roughly comparable)."""
    from nanopali.nn.moe import idle_expert_parameters
    from nanopali.world.recipe.cycles import TARGETS

    scores = json.loads((work / "scores.json").read_text()) if (work / "scores.json").is_file() else {}
    header = ["run", *TARGETS, "parameters (total / active)", "expert load (max / mean)",
              "train ex/s (logged, shared CPUs)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run, (_, recipe) in RUNS.items():
        source = finished(work / run, recipe["steps"])
        if source is None:
            continue
        model = PaliGemma.from_pretrained(source)
        total = sum(p.numel() for p in model.parameters())
        rows = [json.loads(x) for x in (work / run / "metrics.jsonl").read_text().splitlines()]
        speed = float(np.median([r["examples_per_s"] for r in rows if "examples_per_s" in r]))
        load = expert_load(work, run) if any("expert_counts" in r for r in rows) else []
        metrics = scores.get(run, {})
        values = [("n/a" if k not in metrics else f"{metrics[k]:.3f}" if k == "detect/map50" else
                   f"{100 * metrics[k]:.1f} %") for k in TARGETS]
        active = total - idle_expert_parameters(model)
        balance = f"{max(load):.2f} (layers {min(load):.2f}-{max(load):.2f})" if load else "-"
        cells = [run, *values, f"{total / 1e6:.1f} M / {active / 1e6:.1f} M", balance, f"{speed:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sign_test(wins: int, losses: int) -> float:
    """Two-sided p-value of `wins` against `losses` when either is equally likely (exact binomial)."""
    n, k = wins + losses, min(wins, losses)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0


def paired(work: Path, pair: str) -> dict[str, tuple[int, int, float]]:
    """Per task ("vqa" = every question): (examples the MoE scores higher on, examples the dense twin scores
    higher on, sign-test p) over the examples both runs of `pair` answered (WORK/records-<run>.json)."""
    moe, dense = ({(r["scene"], r["prefix"]): r for r in json.loads((work / f"records-{pair}-{kind}.json").read_text())}
                  for kind in ("moe", "dense"))
    if moe.keys() != dense.keys():
        raise ValueError(f"the two runs of {pair} were not scored on the same examples")
    out = {}
    for task in sorted({r["task"] for r in moe.values()} | {"vqa"}):
        rows = [(a["score"], dense[key]["score"]) for key, a in moe.items()
                if (a["task"] == task or task == "vqa" and a["task"].startswith("vqa/"))]
        wins, losses = sum(a > b for a, b in rows), sum(a < b for a, b in rows)
        out[task] = (wins, losses, sign_test(wins, losses))
    return out


def passes_rule(tests: dict[str, tuple[int, int, float]]) -> bool:
    """The condition decided before scoring (module docstring): better at p < 0.05 on captions or on all VQA
    questions, worse at p < 0.05 on no task. Necessary for shipping an MoE, not sufficient."""
    better = any(wins > losses and p < 0.05 for task, (wins, losses, p) in tests.items() if task in ("caption", "vqa"))
    return better and not any(losses > wins and p < 0.05 for wins, losses, p in tests.values())


def stage_report(work: Path) -> str:
    """comparison() and each pair's paired sign tests as markdown, written to WORK/comparison.md."""
    header = "| pair | task | examples the MoE scores higher on | the dense twin higher | sign test p |"
    lines = [comparison(work), "", header, "|---|---|---|---|---|"]
    verdicts = []
    for pair in ("scratch", "upcycle"):
        if not all((work / f"records-{pair}-{kind}.json").is_file() for kind in ("moe", "dense")):
            continue
        tests = paired(work, pair)
        lines += [f"| {pair} | {task} | {wins} | {losses} | {p:.3g} |" for task, (wins, losses, p) in tests.items()]
        verdicts.append(f"{pair}: the MoE {'meets' if passes_rule(tests) else 'fails'} the rule's condition for "
                        f"shipping (necessary, not sufficient)")
    text = "\n".join(lines + [""] + verdicts) + "\n"
    (work / "comparison.md").write_text(text)
    return text


def stage_ship(work: Path, pair: str) -> Path:
    """Copy the MoE run of `pair` ("scratch" or "upcycle") to MOE_MODEL_DIR in bf16, with tokenizer and VQ-VAE."""
    source = finished(work / f"{pair}-moe", RUNS[f"{pair}-moe"][1]["steps"])
    if source is None:
        raise SystemExit(f"{pair}-moe has not finished training: run its train stage first")
    return ship_checkpoint(source, MOE_MODEL_DIR, DEFAULT_MODEL_DIR / CHECKPOINT_NAME)

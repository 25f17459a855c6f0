"""The default model's card: its README.md rendered from card_template.md, the recipe and its held-out scores.

    text = model_card(work, source_checkpoint, metrics)    # metrics: world/eval.evaluate_world's

Everything the card states about how the model was made is read from cycles.py, so the card
and the recipe cannot disagree; the held-out scores are compared with cycles.TARGETS.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nanopali.config import PaliGemmaConfig
from nanopali.models.paligemma import PaliGemma
from nanopali.world.recipe.cycles import (
    FIRST_SCENE,
    MORE,
    MORE_REPEAT,
    N_SCENES,
    RECIPE_ONLY,
    REPEAT,
    RUNS,
    TARGETS,
    TEXT,
    TRAIN,
    VISION,
    WARMUP,
    WARMUP_COMMON,
)

TEMPLATE = Path(__file__).with_name("card_template.md")


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


def cycle_line(k: int, cycle: dict) -> str:
    """The card's list item for MORE[k]."""
    repeat = cycle.get("repeat", MORE_REPEAT)
    shown = ", ".join(f"{task} {n}x" for task, n in repeat.items() if n != REPEAT.get(task, 1))
    aux = (f", plus the vision warm-up's per-patch labels as an auxiliary loss of weight {cycle['patch_loss']} "
           f"(nanopali/world/patch_warmup.PatchLoss)" if cycle.get("patch_loss") else "")
    changed = {key: v for key, v in cycle.items() if key not in RECIPE_ONLY and v != TRAIN.get(key)}
    note = f"; {cycle['note']}" if cycle.get("note") else ""
    split = cycle.get("data", "train")
    last = FIRST_SCENE[split] + N_SCENES[split] - 1
    data = (f", on the data stage's \"{split}\" split (scenes {FIRST_SCENE[split]}-{last} "
            f"of the training seed, none seen by an earlier cycle)" if split != "train" else "")
    return (f"{7 + k}. **Cycle {2 + k}**: {cycle['steps']} more steps from the previous cycle's last weights, a fresh "
            f"optimizer and data order{data}, per epoch {shown} (instead of 2x){aux}: `{json.dumps(changed)}` "
            f"(the rest as above){note}.\n")


def metrics_row(key: str, target: float, metrics: dict) -> str:
    """The scores table's row of one metric: value, target, whether it is met, the number of examples."""
    value = metrics.get(key)
    shown = "n/a" if value is None else f"{100 * value:.1f} %" if key != "detect/map50" else f"{value:.3f}"
    wanted = f"{100 * target:.0f} %" if key != "detect/map50" else f"{target:.2f}"
    met = "n/a" if value is None else "yes" if value >= target else "**no**"
    count = metrics.get("n/" + key.split("/")[0] if not key.startswith("vqa") else "n/" + key, "")
    return f"| {key} | {shown} | {wanted} | {met} | {count} |"


def model_card(work: Path, source: Path, metrics: dict) -> str:
    """The model card: what the model is, how it was made, and its held-out scores against the targets.
    `source` is the shipped checkpoint (inside one of the RUNS directories of `work`); WORK/times.json and
    WORK/limitations.md are used when present."""
    times = json.loads((work / "times.json").read_text()) if (work / "times.json").is_file() else {}
    params = sum(t.numel() for t in PaliGemma.from_pretrained(source).parameters())
    more = "".join(cycle_line(k, cycle) for k, cycle in enumerate(MORE[:RUNS.index(source.parent.name)]))
    limitations = work / "limitations.md"
    return TEMPLATE.read_text().format(
        metrics_table="\n".join(metrics_row(key, target, metrics) for key, target in TARGETS.items()),
        params=f"{params / 1e6:.1f}", steps=TRAIN["steps"], more=more,
        times=", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()), train=json.dumps(TRAIN),
        vision=json.dumps(VISION), text=json.dumps(TEXT), n_scenes=N_SCENES["train"],
        vocab=PaliGemmaConfig.from_pretrained(source).text_config.vocab_size, mb=f"{2 * params / 2**20:.0f}",
        warmup=json.dumps([{**phase, **WARMUP_COMMON} for phase in WARMUP]), warmup_acc=warmup_accuracy(work),
        limitations=limitations.read_text() if limitations.is_file() else "Not assessed yet.")

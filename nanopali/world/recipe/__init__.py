"""The recipe of nanopali's shipped default model, reproducible from seeds (scripts/make_default_model.py runs it).

    cycles.py     the numbers: sizes, seeds, scene counts, the vision warm-up, the table of training cycles
    data.py       world scenes as arrays with their examples, and the trainer's dataset over them
    card.py       the model card (README.md) from card_template.md, the recipe and the held-out scores
    stages.py     the resumable stages, tokenizer to ship, that use all of the above
"""

from nanopali.world.recipe.card import cycle_line, model_card
from nanopali.world.recipe.cycles import MORE, RUNS, patch_loss
from nanopali.world.recipe.data import WorldExamples
from nanopali.world.recipe.stages import STAGES

__all__ = ["MORE", "RUNS", "STAGES", "WorldExamples", "cycle_line", "model_card", "patch_loss"]

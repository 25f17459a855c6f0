"""Training: data, freezing recipes, the loop, checkpoints and distributed helpers."""

from .data import DataError, Example, JsonlDataset
from .loop import TrainConfig, fit
from .recipes import RECIPES, apply_recipe

__all__ = ["DataError", "Example", "JsonlDataset", "RECIPES", "TrainConfig", "apply_recipe", "fit"]

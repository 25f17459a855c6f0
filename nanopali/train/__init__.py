"""Training: data, freezing recipes, the loop, checkpoints and distributed helpers."""

from nanopali.train.data import DataError, Example, JsonlDataset
from nanopali.train.loop import TrainConfig, fit
from nanopali.train.recipes import RECIPES, apply_recipe

__all__ = ["DataError", "Example", "JsonlDataset", "RECIPES", "TrainConfig", "apply_recipe", "fit"]

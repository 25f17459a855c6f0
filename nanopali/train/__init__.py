"""Training: data, freezing recipes, the loop, checkpoints and distributed helpers."""

from nanopali.train.data import DataError, Example, JsonlDataset
from nanopali.train.loop import TrainConfig, TrainingInterrupted, fit
from nanopali.train.recipes import RECIPES, apply_recipe

__all__ = ["RECIPES", "DataError", "Example", "JsonlDataset", "TrainConfig", "TrainingInterrupted", "apply_recipe", "fit"]

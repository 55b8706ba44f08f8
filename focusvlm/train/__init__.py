"""Training with focusvlm's methods switched on: LLaVA-1.5's two stages (``focusvlm train``).

    from focusvlm.train import train, Recipe, validate_data
    train(stage="finetune", model="demo", data="data.json", image_folder="images",
          focus_config="focus.yaml", output_dir="runs/ft", overrides={"format": "chat_template"})

See docs/training.md.
"""

from .data import DataError, SupervisedDataset
from .formats import FORMATS, ChatFormat
from .recipe import Recipe, RecipeError
from .runner import TrainResult, merge_lora, train
from .validate import validate_data

__all__ = ["ChatFormat", "DataError", "FORMATS", "Recipe", "RecipeError", "SupervisedDataset", "TrainResult",
           "merge_lora", "train", "validate_data"]

"""Training: a run is built (build.py), fitted by a small loop (loop.py) whose concerns are hooks
(hooks.py, budget_hook.py), then tested and reported (run.py). `train` does all of it."""

from cnnkit.errors import TrainingError, TrainingInterrupted
from cnnkit.preprocess import make_preprocess
from cnnkit.training.build import Setup
from cnnkit.training.loop import EpochEnd, Hook, Loop, TrainState
from cnnkit.training.optim import make_optimizer, param_groups
from cnnkit.training.run import TrainResult, prepare, run_training, train
from cnnkit.training.schedule import lr_factor, warmup_steps

__all__ = ["EpochEnd", "Hook", "Loop", "Setup", "TrainResult", "TrainState", "TrainingError", "TrainingInterrupted",
           "lr_factor", "make_optimizer", "make_preprocess", "param_groups", "prepare", "run_training",
           "train", "warmup_steps"]

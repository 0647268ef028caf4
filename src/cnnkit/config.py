"""The typed configuration a recipe becomes, with command-line overrides and validation.

A recipe is a TOML file in cnnkit/recipes/ whose keys are fields of `Config`. The resolved
configuration is saved in the run folder and in every checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import tomllib
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from cnnkit.errors import ConfigError

CHOICES = {
    "optimizer": ("adam", "adamw", "sgd", "muon"),
    "schedule": ("constant", "onecycle", "cosine", "linear"),
    "precision": ("fp32", "bf16", "fp16", "auto"),
    "device": ("auto", "cpu", "cuda"),
    "class_balance": ("none", "weights", "sampler"),
    "tta": ("none", "flip", "shift", "flip-shift"),
    "on_nonfinite": ("stop", "skip"),
    "strategy": ("full", "linear-probe", "frozen", "finetune", "gradual", "auto"),
    "grey_input": ("repeat", "sum"),
    "inference_engine": ("torch", "onnxruntime", "compile", "int8"),
}


AUTO_STRATEGIES = ("linear-probe", "frozen", "gradual", "finetune")  # what --strategy auto chooses among, cheapest first


# Model arguments of a linear probe's alone (models.block_pooled, models.signed_power; named here, as this
# module imports no torch): --strategy auto's trained strategies leave them out.
PROBE_MODEL_ARGS = ("pooled_blocks", "head_power")


def opt(default: Any, doc: str) -> Any:
    """A Config field and its help text, which `cnnkit train --help` shows for its flag. Lists and
    dicts get a fresh copy for each Config."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": doc})
    return field(default=default, metadata={"help": doc})


def field_help() -> dict[str, str]:
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(Config)}


@dataclass(frozen=True)
class Config:
    """Every setting of a run. Frozen: a run never changes what it was asked to do (its own
    decisions go to the run record, runs.RunRecord); `dataclasses.replace` makes a changed copy."""

    # -- the run
    recipe: str = opt("", "the recipe this configuration came from")
    description: str = opt("", "one line for `cnnkit recipes`")
    seed: int = opt(0, "seeds the splits, the initialisation, the data order and augmentation")
    device: str = opt("auto", "auto: CUDA when available, else CPU")
    threads: int | None = opt(None, "CPU threads for torch; default: torch's choice (all cores)")
    # -- data
    dataset: str = opt("fashion-mnist", "fashion-mnist | cifar10 | folder (with no --recipe: what --data-dir holds)")
    data_dir: str | None = opt(None, "where the data is; see `cnnkit datasets`")
    image_size: int | None = opt(None, "folder datasets: images are decoded to this square size (default 64)")
    channels: int | None = opt(None, "folder datasets: 1 (grey) or 3 (RGB, default)")
    skip_bad_images: bool = opt(False, "skip and count undecodable files instead of stopping")
    val_fraction: float = opt(0.1, "validation carved from train (seeded, stratified) when the source has none")
    test_fraction: float = opt(0.2, "test carved from train, only when the source has no test split")
    max_train_samples: int | None = opt(None, "stratified subset of train, for quick tries")
    final_fit: bool = opt(False, "a final run after settings were chosen (cnnkit tune --final): the validation images train too, and the last epoch is tested")
    max_eval_samples: int | None = opt(None, "stratified subsets of validation and test")
    class_balance: str = opt("none", "none | weights (loss weights) | sampler (balanced batches); a linear probe's head: either weighs each class alike")
    # -- model
    model: str = opt("seed-cnn", "seed-cnn, or any timm model name")
    model_args: dict[str, Any] = opt({}, "passed to the model's constructor; for a timm model also cnnkit's head_hidden (N units "
                                      "before the classifier), and for a linear probe pooled_blocks (N last blocks' pooled "
                                      "outputs joined to the features) and head_power (p: features to the power p, signed)")
    input_size: int | None = opt(None, "model input size; images are resized on the device (default: data size, or the weights' size)")
    progressive_sizes: list[int] = opt([], "progressive resizing: the training input size of epoch 1, 2, ... (e.g. [20, 24]); later epochs, validation and test use the input size. Early epochs at fewer pixels cost fewer FLOPs")
    pretrained: bool = opt(False, "start from ImageNet weights (timm models): --weights, else the offline registry, else timm's download")
    weights: str | None = opt(None, "a weights file (safetensors, or a state dict) for --pretrained")
    strategy: str = opt("full", "full: every layer | linear-probe: frozen backbone, cached features, fitted linear head | frozen: backbone frozen, head trained with augmentation | finetune: head_epochs of head only, then every layer | gradual: head first, then one more block every unfreeze_epochs | auto: the best of auto_strategies, measured on the same cross-validation folds of the training images")
    head_epochs: float = opt(1.0, "finetune, gradual: epochs that train only the new head (backbone frozen, its BatchNorm in inference mode)")
    unfreeze_epochs: float = opt(1.0, "gradual: epochs between unfreezing one more block, from the top down")
    keep_frozen: int = opt(0, "finetune, gradual: this many layer groups nearest the input never train (faster; Lite0 has 9)")
    frozen_batchnorm: bool = opt(False, "finetune, gradual: every BatchNorm layer keeps its ImageNet statistics (inference mode) also once its layers train (only its scale and shift learn): small batches of few photos give noisy statistics")
    cache_frozen: bool = opt(False, "finetune, gradual, frozen with keep_frozen: the frozen groups' outputs for each training image and its mirror are computed once and kept in memory (bf16); the steps then run only the layers that train. Flips stay exact, translate becomes a shift of the kept maps by whole cells, other augmentation is refused")
    cache_frozen_gb: float = opt(4.0, "cache_frozen's memory bound in GB: a run whose kept outputs would need more trains through every layer (a warning says so)")
    layer_lr_decay: float = opt(1.0, "discriminative learning rates: each layer group below the head learns this many times slower than the one above")
    probe_candidates: list[str] = opt([], "linear-probe: pretrained backbones to choose from by k-fold cross-validation on the training images, e.g. '[\"tf_efficientnet_lite0\", \"tf_efficientnet_lite2\"]' (empty: only --model)")
    probe_flip: bool = opt(False, "linear-probe: mirrored training images as extra rows of features (use with --tta flip)")
    probe_screen: float | None = opt(None, "linear-probe with candidates and probe_flip: score the candidates on their plain views first, and compute the mirrored views only of those within this many standard deviations (of the best one's folds) of the best, e.g. 1.0; unset: every candidate's")
    probe_blocks: int = opt(0, "linear-probe with candidates: also score each backbone with its last N blocks' pooled outputs joined to its features (model argument pooled_blocks, models.block_pooled), from the same forward passes; cross-validation chooses with or without (0: without)")
    probe_concat: bool = opt(False, "linear-probe with candidates: one more candidate, the features of the two best backbones side by side under one linear head (both backbones run at test time), chosen only where cross-validation prefers it")
    cv_folds: int = opt(5, "linear-probe with candidates: folds of the cross-validation that chooses backbone and weight decay")
    auto_strategies: list[str] = opt(list(AUTO_STRATEGIES), "--strategy auto: the strategies measured; the trained ones (frozen, gradual, finetune) with the run's epochs, lr, augment and the like, on the probe's best single backbone")
    auto_trained: dict[str, Any] = opt({}, "--strategy auto: settings of the trained strategies in place of the run's own (the photos recipe's [auto_trained] table: fine-tuning's epochs, lr, augment), so that the probe keeps its own")
    auto_margin: float = opt(1.0, "--strategy auto: the cheapest strategy (linear-probe, frozen, gradual, finetune) within this many standard errors of the best mean accuracy on the folds wins (the one-standard-error rule; the binomial standard error of the best's accuracy on the held-out images); 0: the best mean")
    auto_folds: int | None = opt(None, "--strategy auto: how many of the cv_folds folds each trained strategy is measured on (each is a training run; the probe is compared on the same folds); default all")
    grey_input: str = opt("repeat", "grey images into an RGB-pretrained model: repeat the channel, or sum the first convolution's weights to one input channel")
    # -- optimisation
    epochs: int = 10
    batch_size: int = 64
    eval_batch_size: int = 1024
    optimizer: str = opt("adam", "adam | adamw | sgd | muon (Muon on convolution filters, SGD on the rest)")
    lr: float = opt(1e-3, "peak learning rate")
    momentum: float = opt(0.9, "SGD momentum")
    nesterov: bool = opt(False, "SGD Nesterov momentum (muon: for both parts)")
    muon_lr: float = opt(0.24, "muon: peak learning rate of the orthogonalised filter updates (airbench94_muon)")
    muon_momentum: float = opt(0.6, "muon: momentum of the filter updates")
    betas: list[float] = opt([0.9, 0.999], "Adam/AdamW")
    weight_decay: float = opt(0.0, "applied to weights; to biases and norm parameters only with bias_decay")
    bias_decay: bool = opt(False, "biases and norm parameters decay too, as much per step as the weights (airbench): weight_decay / bias_lr_scale")
    schedule: str = opt("constant", "constant | onecycle | cosine | linear (decay to 0); all but onecycle after warmup_epochs")
    warmup_epochs: float = opt(0.0, "linear warmup from 0 (onecycle: default 30% of training)")
    bias_lr_scale: float = opt(1.0, "learning-rate multiplier for biases and normalisation parameters")
    frozen_after: dict[str, float] = opt({}, "parameter name -> epochs, e.g. '{\"stem.bias\": 3}' (airbench's whitening stem): its learning rate falls linearly to 0 over these epochs from the start, then it no longer trains")
    lookahead: bool = opt(False, "Lookahead of weights as airbench: every 5 steps, slow weights follow and reset the fast ones")
    label_smoothing: float = 0.0
    grad_clip: float | None = opt(None, "clip the gradient norm to this value")
    last_epoch_fraction: float = opt(1.0, "data selection: the last epoch trains on this fraction of the training images, those with the highest loss in the epoch before it (e.g. 0.7: the last epoch costs 0.7 of one). 1.0: every image. Off under --time-budget (the budget plans the length) and --class-balance sampler")
    early_stopping_patience: int | None = opt(None, "stop after this many epochs without a better validation accuracy")
    stop_after_epoch: int | None = opt(None, "end the run after this epoch, its learning-rate schedule still that of all its epochs (--strategy auto sets it where its folds' held-out accuracy was best at an earlier epoch)")
    augment: str | list[dict[str, Any]] = opt("none", "preset (none, seed, light, strong) or list of ops; see `cnnkit augment ops`")
    tta: str = opt("none", "test-time augmentation for the test evaluation: none | flip | shift | flip-shift (validation during training goes without)")
    tta_below: float | None = opt(None, "test-time views only for the images whose top probability from the image alone is below this (e.g. 0.9; the CIFAR-10 speed record does this): the others cost one forward pass")
    fp32: dict[str, Any] = opt({}, "a recipe's settings for CPUs without native bf16, where --precision auto trains in fp32 (about 3 times slower): used there in place of the recipe's own, except fields set on the command line; --fp32 {} trains with the recipe's own")
    precision: str = opt("fp32", "fp32 | bf16 (autocast, CPU or CUDA) | fp16 (CUDA) | auto (bf16 where the CPU or GPU has it natively, else fp32 on CPUs, fp16 on GPUs)")
    channels_last: bool = opt(False, "memory format; often faster for convolutions")
    inference_engine: str = opt("torch", "what runs the forward passes on a CPU once weights are fixed (a linear probe's features, the test, the report, evaluate): torch (BatchNorm folded into the convolutions: 1.1x for EfficientNet-Lite; CNNKIT_FOLD_BATCHNORM=0 leaves it) | onnxruntime (fp32; on the capped Xeon of docs/cpus.md 1.3-1.6x PyTorch's fp32 for EfficientNet-Lite features, slower than bf16 where the CPU has it) | compile (torch.compile with frozen weights: 1.26x for Lite0's features on an AVX2 CPU after 20 s of compiling, for thousands of images; needs a C++ compiler) | int8 (the same in int8, calibrated on the first batch and checked against fp32; needs torchao: pip install 'cnnkit[int8]')")
    compile: bool = opt(False, "torch.compile the training model (compile time counts; needs a C++ compiler on the CPU)")
    time_budget: str | None = opt(None, "e.g. 5m, 90s, 1h: fit the steps (and so the schedule) to end the whole run, test and report included, within it; a linear probe's head learns from as many training images as fit")
    sync_batchnorm: bool = opt(False, "distributed runs: BatchNorm statistics over the global batch, not each process's share")
    # -- robustness
    deterministic: bool = opt(False, "torch deterministic algorithms (an interrupted + resumed run equals an uninterrupted one)")
    on_nonfinite: str = opt("stop", "a NaN/inf loss or gradient: stop (keep the last good checkpoint) | skip (the step; halve the LR)")
    checkpoint_every_epochs: int = opt(1, "save the resumable `last` checkpoint every N epochs")
    checkpoint_every_minutes: float | None = opt(None, "also save it mid-epoch when this many minutes have passed")
    # -- output
    report: bool = opt(True, "write report.html (plots, confusions, Grad-CAM, robustness) at the end")
    report_robustness_samples: int = opt(2000, "test images for the report's robustness section (21 corrupted copies "
                                               "each; at most about half a pass over the run's images, at least 2 "
                                               "a class and 24 in all)")
    tensorboard: bool = opt(False, "also log metrics per epoch to RUN/tensorboard (needs the tensorboard package)")
    output: str = opt("runs", "parent folder of run folders")
    name: str | None = opt(None, "run folder name (default: recipe-date-time)")


    def validate(self) -> Config:
        for key, options in CHOICES.items():
            if getattr(self, key) not in options:
                raise ConfigError(f"{key} must be one of {', '.join(options)}; got {getattr(self, key)!r}")
        for key in ("epochs", "batch_size", "eval_batch_size", "checkpoint_every_epochs"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1; got {getattr(self, key)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive; got {self.lr}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1); got {self.label_smoothing}")
        if self.channels not in (None, 1, 3):
            raise ConfigError(f"channels must be 1 or 3; got {self.channels}")
        if not 0 < self.val_fraction < 1 or not 0 < self.test_fraction < 1:
            raise ConfigError("val_fraction and test_fraction must lie between 0 and 1")
        for key in ("max_train_samples", "max_eval_samples", "image_size", "input_size", "threads", "early_stopping_patience",
                    "report_robustness_samples", "stop_after_epoch"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"{key} must be at least 1; got {value}")
        if any(not isinstance(size, int) or size < 1 for size in self.progressive_sizes):
            raise ConfigError(f"progressive_sizes lists input sizes in pixels (positive whole numbers); got {self.progressive_sizes}")
        if not 0 < self.last_epoch_fraction <= 1:
            raise ConfigError(f"last_epoch_fraction is a fraction of the training images in (0, 1] (1.0: all); "
                              f"got {self.last_epoch_fraction}")
        if self.stop_after_epoch is not None and self.lookahead:
            raise ConfigError("stop_after_epoch ends a run before its last epoch, where Lookahead hands the model its "
                              "slow weights; set --lookahead false, or leave stop_after_epoch unset")
        if self.checkpoint_every_minutes is not None and self.checkpoint_every_minutes < 0:
            raise ConfigError(f"checkpoint_every_minutes must not be negative; got {self.checkpoint_every_minutes}")
        if self.strategy != "full" and not self.pretrained:
            raise ConfigError(f"--strategy {self.strategy} needs --pretrained true (it keeps pretrained layers frozen "
                              "for a while); train a from-scratch model with --strategy full")
        if not 0 < self.layer_lr_decay <= 1:
            raise ConfigError(f"layer_lr_decay must be in (0, 1]; got {self.layer_lr_decay}")
        if self.cv_folds < 2:
            raise ConfigError(f"cv_folds must be at least 2; got {self.cv_folds}")
        if "+" in self.model and self.strategy not in ("linear-probe", "auto"):  # models.concat's name (torch-free here)
            raise ConfigError(f"model {self.model}: backbones side by side are a linear probe's (--strategy "
                              "linear-probe); name one backbone to fine-tune")
        if self.model_args.get("pooled_blocks") and self.strategy not in ("linear-probe", "auto"):  # models.block_pooled
            raise ConfigError("model argument pooled_blocks widens a linear probe's features (--strategy linear-probe, or "
                              "auto, whose trained strategies leave it out); fine-tuning trains the backbone's own head")
        self._check_head_power()
        if self.probe_candidates and self.strategy not in ("linear-probe", "auto"):
            raise ConfigError("probe_candidates chooses a backbone for --strategy linear-probe (or auto); set that "
                              "strategy, or leave probe_candidates empty")
        unknown = [s for s in self.auto_strategies if s not in AUTO_STRATEGIES]
        if unknown or not self.auto_strategies:
            raise ConfigError(f"auto_strategies lists some of {', '.join(AUTO_STRATEGIES)}; got {self.auto_strategies}")
        if {"strategy", "model", "recipe", "fp32"} & set(self.auto_trained) or any(k.startswith("auto_") for k in self.auto_trained):
            raise ConfigError("auto_trained sets how the trained strategies train; it cannot set strategy, model, "
                              "recipe, fp32 or the auto_ fields (--strategy auto chooses those)")
        if self.auto_margin < 0:
            raise ConfigError(f"auto_margin counts standard errors (e.g. 1.0; 0: the best mean wins); got {self.auto_margin}")
        if self.auto_folds is not None and not 1 <= self.auto_folds <= self.cv_folds:
            raise ConfigError(f"auto_folds is how many of the {self.cv_folds} folds (cv_folds) the trained strategies "
                              f"are measured on, 1 to {self.cv_folds}; got {self.auto_folds}")
        if isinstance(self.probe_blocks, bool) or not isinstance(self.probe_blocks, int) or self.probe_blocks < 0:
            raise ConfigError(f"probe_blocks counts blocks (e.g. 3; 0: none); got {self.probe_blocks}")
        if self.probe_blocks and self.model_args.get("pooled_blocks"):
            raise ConfigError("probe_blocks lets cross-validation choose the blocks' features; the model argument "
                              "pooled_blocks sets them for every candidate: give one of the two")
        if self.probe_screen is not None and self.probe_screen < 0:
            raise ConfigError(f"probe_screen counts standard deviations of the folds' accuracy (e.g. 1.0); got {self.probe_screen}")
        if self.keep_frozen < 0:
            raise ConfigError(f"keep_frozen must not be negative; got {self.keep_frozen}")
        if self.cache_frozen_gb <= 0:
            raise ConfigError(f"cache_frozen_gb is a memory bound in GB and must be positive; got {self.cache_frozen_gb}")
        if self.head_epochs < 0 or self.unfreeze_epochs <= 0:
            raise ConfigError("head_epochs must not be negative and unfreeze_epochs must be positive")
        if self.muon_lr <= 0 or not 0 <= self.muon_momentum < 1:
            raise ConfigError(f"muon_lr must be positive and muon_momentum in [0, 1); got {self.muon_lr} and {self.muon_momentum}")
        if self.bias_lr_scale <= 0:
            raise ConfigError(f"bias_lr_scale must be positive; got {self.bias_lr_scale}")
        bad = {name: e for name, e in self.frozen_after.items() if not isinstance(e, (int, float)) or isinstance(e, bool) or e <= 0}
        if bad:
            raise ConfigError(f"frozen_after maps parameter names to a positive number of epochs; got {bad}")
        if self.time_budget is not None:
            from cnnkit.budget import parse_duration

            parse_duration(self.time_budget)
        if self.fp32:
            if {"fp32", "precision", "recipe"} & set(self.fp32):
                raise ConfigError("a recipe's [fp32] table cannot set fp32, precision or recipe")
            with_fp32_settings(self)  # its fields exist and their values are valid
        if self.tta_below is not None and not 0 < self.tta_below <= 1:
            raise ConfigError(f"tta_below is a probability in (0, 1]; got {self.tta_below}")
        if len(self.betas) != 2:
            raise ConfigError(f"betas must be two numbers; got {self.betas}")
        return self

    def _check_head_power(self) -> None:
        """The model argument head_power (models.signed_power; the name is written out here, as this
        module imports no torch): a power in (0, 1], for a linear probe's head."""
        power = self.model_args.get("head_power")
        if power is None:
            return
        if isinstance(power, bool) or not isinstance(power, (int, float)) or not 0 < power <= 1:
            raise ConfigError(f"model argument head_power is the power of the probe's features, in (0, 1] (0.5: their "
                              f"signed square root); got {power!r}")
        if self.strategy not in ("linear-probe", "auto"):
            raise ConfigError("model argument head_power power-normalises a linear probe's features (--strategy "
                              "linear-probe, or auto, whose trained strategies leave it out); its gradient is "
                              "unbounded at zero, so a trained backbone does without")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "configuration") -> Config:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in d if k not in names]
        if unknown:
            hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, names, 1)) else k for k in unknown]
            raise ConfigError(f"{where}: unknown field(s): {', '.join(hints)}")
        cfg = cls(**{k: _check_type(k, v, where) for k, v in d.items()})
        return cfg.validate()


def field_types() -> dict[str, Any]:
    return typing.get_type_hints(Config)


def _check_type(key: str, value: Any, where: str) -> Any:
    expected = field_types()[key]
    allowed = _base_types(expected)
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if value is None and type(None) in allowed:
        return value
    if not isinstance(value, tuple(t for t in allowed if t is not type(None))) or (isinstance(value, bool) and bool not in allowed):
        raise ConfigError(f"{where}: {key} should be {_type_name(expected)}, got {value!r}")
    return value


def _base_types(tp: Any) -> tuple[type, ...]:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return tuple(t for arg in typing.get_args(tp) for t in _base_types(arg))
    origin = typing.get_origin(tp)
    return (origin,) if origin else (tp,)


def _type_name(tp: Any) -> str:
    return " or ".join(t.__name__ if t is not type(None) else "none" for t in _base_types(tp))


def parse_override(key: str, text: str) -> Any:
    """Turn a command-line string into the field's type: numbers, booleans, none, JSON lists/dicts."""
    allowed = _base_types(field_types()[key])
    if type(None) in allowed and text.lower() in ("none", "null", ""):
        return None
    if bool in allowed:
        if text.lower() in ("true", "yes", "1", "on"):
            return True
        if text.lower() in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"--{key.replace('_', '-')}: expected true or false, got {text!r}")
    for t in (int, float):
        if t in allowed:
            try:
                return t(text)
            except ValueError:
                if str not in allowed and float not in allowed:
                    raise ConfigError(f"--{key.replace('_', '-')}: expected {t.__name__}, got {text!r}") from None
    if (list in allowed or dict in allowed) and text.lstrip()[:1] in ("[", "{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--{key.replace('_', '-')}: invalid JSON ({e})") from None
    if str in allowed:
        return text
    raise ConfigError(f"--{key.replace('_', '-')}: expected {_type_name(field_types()[key])}, got {text!r}")


# -- recipes


def recipe_names() -> list[str]:
    return sorted(p.name[: -len(".toml")] for p in resources.files("cnnkit.recipes").iterdir() if p.name.endswith(".toml"))


def load_recipe(name_or_path: str) -> Config:
    """A recipe by name (shipped with cnnkit) or by path to a TOML file."""
    path = Path(name_or_path)
    if name_or_path.endswith(".toml") and path.is_file():
        text, where = path.read_text(), str(path)
    else:
        names = recipe_names()
        if name_or_path not in names:
            close = difflib.get_close_matches(name_or_path, names, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown recipe {name_or_path!r}.{hint} Run `cnnkit recipes` to list them.")
        text = (resources.files("cnnkit.recipes") / f"{name_or_path}.toml").read_text()
        where = f"recipe {name_or_path}"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: not valid TOML ({e})") from None
    data.pop("tune", None)  # the search space of `cnnkit tune` (cnnkit.tune), not a field of the run
    data.setdefault("recipe", path.stem if path.suffix == ".toml" else name_or_path)
    return Config.from_dict(data, where)


def fp32_settings(cfg: Config, asked: Iterable[str] = ()) -> dict[str, Any]:
    """The recipe's [fp32] settings that apply: all but the fields in `asked` (set on the command line)."""
    kept = set(asked)
    return {key: value for key, value in cfg.fp32.items() if key not in kept}


def with_fp32_settings(cfg: Config, asked: Iterable[str] = ()) -> Config:
    """`cfg` with its recipe's [fp32] settings in place of its own (see `fp32_settings`); for a run
    that trains in fp32 on a CPU (`runtime.trains_in_fp32_on_cpu`). The table is emptied, so that
    config.json holds the settings used and a resumed run does not apply them again."""
    return Config.from_dict({**cfg.to_dict(), **fp32_settings(cfg, asked), "fp32": {}},
                            f"{cfg.recipe or 'the recipe'}'s [fp32] settings")


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """`cfg` with `overrides` (the command line's): a field set there is set for --strategy auto's
    trained strategies too, in place of the recipe's [auto_trained] setting."""
    trained = {k: v for k, v in cfg.auto_trained.items() if k not in overrides}
    return Config.from_dict({**cfg.to_dict(), "auto_trained": trained, **overrides}, "command line")

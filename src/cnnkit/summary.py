"""`cnnkit summary`: every layer of a network with its shapes, parameters, multiply-adds,
activation memory and receptive field, and the course's output-size formula checked against the
shapes PyTorch actually produces.

Why by hand and not torchinfo: torchinfo gives shapes, parameters and MACs, but neither the
receptive field of a layer's units nor the formula the course teaches, and both need the same
pass over the network; one forward pass with hooks gives all of it.

The receptive field of a unit (its size on the input, the jump between neighbouring units, and
where the first unit's field is centred) follows a tensor through the network: a convolution or
pooling of kernel k, stride s and padding p turns (size r, jump j, start c) into
(r + (k - 1)·j, j·s, c + ((k - 1)/2 - p)·j). Where a tensor comes from an operation that is no
module (a residual addition, a flatten), it takes the widest field recorded at its resolution.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

SPATIAL = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


@dataclass
class Layer:
    name: str
    type: str
    kernel: list[int] | None
    stride: list[int] | None
    padding: list[int] | str | None
    input_shape: list[int]
    output_shape: list[int]
    params: int
    macs: int
    activation_bytes: int  # the output for one image, as float32
    receptive_field: dict[str, float] | None  # size, jump, start (pixels of the model's input)
    formula: str | None = None  # out = floor((in + 2p - k) / s) + 1, with the numbers
    formula_ok: bool | None = None  # the formula's height equals PyTorch's


def _pair(v: Any) -> list[int]:
    return [int(x) for x in v] if isinstance(v, (tuple, list)) else [int(v), int(v)]


def geometry(module: nn.Module, in_hw: tuple[int, int]) -> tuple[list[int], list[int], list[int] | str, list[int]]:
    """Kernel, stride, padding and dilation of a spatial layer (a global pool: kernel = its input)."""
    if isinstance(module, GLOBAL_POOLS):
        return list(in_hw), list(in_hw), [0, 0], [1, 1]
    padding = module.padding if isinstance(module.padding, str) else _pair(module.padding)
    if type(module).__name__.endswith("Same"):  # timm's TF-style dynamic "same" padding
        padding = "same"
    dilation = _pair(getattr(module, "dilation", 1))
    return _pair(module.kernel_size), _pair(module.stride), padding, dilation


def output_size(size: int, kernel: int, stride: int, padding: int | str, dilation: int = 1,
                ceil_mode: bool = False) -> tuple[int, str]:
    """The course's formula, out = floor((in + 2·padding − kernel) / stride) + 1, and its text."""
    if padding == "same":
        return math.ceil(size / stride), f"ceil({size} / {stride}) = {math.ceil(size / stride)} (\"same\" padding)"
    k = dilation * (kernel - 1) + 1
    rounding = math.ceil if ceil_mode else math.floor
    out = rounding((size + 2 * padding - k) / stride) + 1
    name = "ceil" if ceil_mode else "floor"
    return out, f"{name}(({size} + 2·{padding} − {k}) / {stride}) + 1 = {out}"


def _field(rf: dict[str, float], kernel: int, stride: int, padding: int | str, dilation: int,
           size: int) -> dict[str, float]:
    k = dilation * (kernel - 1) + 1
    # TF's "same" pads (out - 1)·s + k − in in all, the smaller half before (timm's pad_same)
    pad = max((math.ceil(size / stride) - 1) * stride + k - size, 0) // 2 if padding == "same" else padding
    return {"size": rf["size"] + (k - 1) * rf["jump"], "jump": rf["jump"] * stride,
            "start": rf["start"] + ((k - 1) / 2 - pad) * rf["jump"]}


def layers_of(model: nn.Module, depth: int | None = None) -> list[tuple[str, nn.Module]]:
    """Modules without children, or cut at `depth` (1: the model's children)."""
    out = []
    for name, module in model.named_modules():
        level = name.count(".") + 1 if name else 0
        if not name:
            continue
        own_params = any(True for _ in module.parameters(recurse=False))  # e.g. timm's BatchNormAct2d
        if depth is not None and level == depth or own_params or not any(True for _ in module.children()):
            if not any(name.startswith(prefix + ".") for prefix, _ in out):
                out.append((name, module))
    return out


@torch.no_grad()
def summarize(model: nn.Module, input_shape: tuple[int, int, int], depth: int | None = None,
              batch_size: int = 64) -> dict[str, Any]:
    """Run one image of `input_shape` (C, H, W) through `model` (in eval mode) and describe each
    layer, leaves by default or modules `depth` levels down. Returns the `--json` rows and totals."""
    leaves = layers_of(model, depth)
    fields: dict[int, dict[str, float]] = {}  # id(tensor) -> receptive field of its units
    by_size: dict[tuple[int, int], dict[str, float]] = {}  # the widest field seen at each resolution
    rows: list[Layer] = []
    alive: list[torch.Tensor] = []  # ids stay unique only while their tensors live
    x = torch.zeros(1, *input_shape, device=next(model.parameters()).device)
    start = {"size": 1.0, "jump": 1.0, "start": 0.5}  # pixel centres at 0.5, 1.5, ...
    fields[id(x)], by_size[tuple(input_shape[1:])] = start, start

    def field_of(t: torch.Tensor) -> dict[str, float] | None:
        if id(t) in fields:
            return fields[id(t)]
        return by_size.get(tuple(t.shape[-2:])) if t.ndim == 4 else None

    def record(name: str, module: nn.Module, inputs: tuple, output: Any) -> None:
        inp = next((t for t in inputs if isinstance(t, torch.Tensor)), None)
        out = output[0] if isinstance(output, (tuple, list)) else output
        if inp is None or not isinstance(out, torch.Tensor):
            return
        rf = field_of(inp) or (max(by_size.values(), key=lambda f: f["size"]) if by_size else None)
        kernel = stride = padding = formula = formula_ok = None
        if isinstance(module, SPATIAL + GLOBAL_POOLS) and inp.ndim == 4 and rf is not None:
            kernel, stride, padding, dilation = geometry(module, tuple(inp.shape[-2:]))
            rf = _field(rf, kernel[0], stride[0], padding if isinstance(padding, str) else padding[0], dilation[0],
                        inp.shape[-2])
            if not isinstance(module, GLOBAL_POOLS):
                out_h, formula = output_size(inp.shape[-2], kernel[0], stride[0],
                                             padding if isinstance(padding, str) else padding[0], dilation[0],
                                             bool(getattr(module, "ceil_mode", False)))
                formula_ok = out_h == out.shape[-2]
        alive.append(out)
        if out.ndim == 4 and rf is not None:
            fields[id(out)] = rf
            hw = tuple(out.shape[-2:])
            if hw not in by_size or by_size[hw]["size"] < rf["size"]:
                by_size[hw] = rf
        rows.append(Layer(name, type(module).__name__, kernel, stride, padding, list(inp.shape[1:]),
                          list(out.shape[1:]), sum(p.numel() for p in module.parameters()), _macs(module, out),
                          out[0].numel() * 4, dict(rf) if rf is not None else None, formula, formula_ok))

    handles = [m.register_forward_hook(lambda mod, i, o, n=n: record(n, mod, i, o)) for n, m in leaves]
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    total_params = sum(p.numel() for p in model.parameters())
    activations = sum(r.activation_bytes for r in rows)
    return {
        "input_shape": list(input_shape), "layers": [asdict(r) for r in rows],
        "total_params": total_params, "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_macs": sum(r.macs for r in rows),
        "formula_mismatches": [r.name for r in rows if r.formula_ok is False],
        # weights, gradients, two optimiser buffers (Adam's moments; SGD's momentum is one), and every
        # layer's output kept for the backward pass, in float32
        "training_memory_bytes": 4 * 4 * total_params + batch_size * activations, "batch_size": batch_size,
    }


def _macs(module: nn.Module, out: torch.Tensor) -> int:
    """Multiply-adds for one image: a convolution's output positions x its kernel volume, a dense
    layer's inputs x outputs; other layers count as none."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return out[0].numel() * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return out[0].numel() * module.in_features
    return 0


def format_shape(shape: list[int]) -> str:
    return "x".join(map(str, shape))


def human(n: float, unit: str = "") -> str:
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".strip()


DATA_SHAPES = {"fashion-mnist": (1, 28), "cifar10": (3, 32)}  # folder datasets: the recipe's channels and size


def network_to_summarise(run: Path | None, recipe: str | None, model: str | None, input_size: int | None,
                         channels: int | None, classes: int) -> tuple[nn.Module, tuple[int, int, int], int, str]:
    """The network `cnnkit summary` describes, its input shape (C, H, W), a batch size for the
    memory estimate, and a name: a run's trained model, a recipe's untrained one, or a model by name."""
    from cnnkit.errors import ConfigError
    from cnnkit.models import create_model

    if sum(x is not None for x in (run, recipe, model)) != 1:
        raise ConfigError("cnnkit summary takes one of: a run folder, --recipe R or --model NAME")
    if run is not None:
        from cnnkit.runs import load_run

        loaded = load_run(run)
        pre = loaded.preprocess
        batch = loaded.meta.get("config", {}).get("batch_size", 64)
        return loaded.model, (pre.model_channels, pre.input_size, pre.input_size), batch, f"run {run}"
    if recipe is not None:
        from cnnkit.config import load_recipe
        from cnnkit.models.pretrained import input_size

        cfg = load_recipe(recipe)
        c, size = DATA_SHAPES.get(cfg.dataset, (cfg.channels or 3, cfg.image_size or 64))
        if cfg.pretrained:
            c = 1 if c == 1 and cfg.grey_input == "sum" else 3
            size = input_size(cfg.model, cfg.input_size)
        size = cfg.input_size or size
        net = create_model(cfg.model, classes, c, size, **cfg.model_args)  # the head's arguments included
        return net, (c, size, size), cfg.batch_size, f"recipe {recipe} ({cfg.model}, untrained)"
    own = model in ("seed-cnn", "fastnet")
    c = channels or (1 if own else 3)
    size = input_size or (28 if own else 224)
    return create_model(model, classes, c, size), (c, size, size), 64, f"{model} (untrained)"

"""`cnnkit explain RUN IMAGE`: one image followed through the user's own network, as the course
draws it: the input after the run's preprocessing, the feature maps of each stage (the first
layer's filters with them), max and average pooling of one map, the receptive field of one unit,
the flattened vector and the dense layers, softmax with its numbers, the cross-entropy loss
against a given label, and Grad-CAM for the top classes.

`explain_image` returns numbers and small arrays (the server's POST /explain sends them as JSON
and PNGs); `write_page` makes the self-contained HTML page. Images are drawn with Pillow and a
colour map of our own (a few lines of numpy) rather than matplotlib: importing matplotlib alone
takes about a second, and a page should come back in well under three.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from cnnkit.analysis import grad_cam, last_conv
from cnnkit.fileio import write_bytes_atomic
from cnnkit.models.concat import layer_label
from cnnkit.preprocess import Preprocess
from cnnkit.summary import layers_of, summarize

MAX_STAGES = 8
# viridis at five points: dark blue (low) to yellow (high); np.interp fills in between
_ANCHORS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


def colour(values: np.ndarray) -> np.ndarray:
    """A 2-D array in [0, 1] as an RGB uint8 image in the viridis colours."""
    v = np.clip(values, 0, 1) * (len(_ANCHORS) - 1)
    idx = np.arange(len(_ANCHORS))
    return np.stack([np.interp(v, idx, _ANCHORS[:, c]) for c in range(3)], -1).astype(np.uint8)


def normalise(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def to_pil(img: np.ndarray, size: int = 0) -> Image.Image:
    """(H, W), (H, W, 3) in [0, 1] or uint8 -> a Pillow image, enlarged to `size` pixels (nearest)."""
    arr = img if img.dtype == np.uint8 else (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    im = Image.fromarray(arr)
    if size and im.width < size:
        im = im.resize((size, round(size * im.height / im.width)), Image.NEAREST)
    return im


def png(im: Image.Image) -> str:
    """A data: URI, so that the page needs no other file."""
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def grid(tiles: list[Image.Image], columns: int = 8, gap: int = 2) -> Image.Image:
    w, h = max(t.width for t in tiles), max(t.height for t in tiles)
    rows = -(-len(tiles) // columns)
    out = Image.new("RGB", (columns * (w + gap) - gap, rows * (h + gap) - gap), "white")
    for i, t in enumerate(tiles):
        out.paste(t.convert("RGB"), ((i % columns) * (w + gap), (i // columns) * (h + gap)))
    return out


@torch.no_grad()
def _forward(model: nn.Module, x: torch.Tensor) -> tuple[list[dict[str, Any]], torch.Tensor, torch.Tensor | None]:
    """The output of the last layer at each resolution (the network's stages), and the logits."""
    outputs: list[tuple[str, str, torch.Tensor]] = []
    flat: dict[str, Any] = {}
    handles = []

    def keep(mod: nn.Module, inputs: tuple, out: Any, name: str) -> None:
        if isinstance(out, torch.Tensor) and out.ndim == 4 and out.shape[-1] > 1:
            outputs.append((name, type(mod).__name__, out.detach().clone()))
        elif isinstance(mod, nn.Linear) and "vector" not in flat:  # what the first dense layer takes
            flat["vector"] = inputs[0].detach().flatten(1).clone()

    for name, module in layers_of(model):  # the rows of `cnnkit summary`, so that their fields are known
        handles.append(module.register_forward_hook(lambda m, i, o, n=name: keep(m, i, o, n)))
    try:
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
    last_at: dict[tuple[int, int], tuple[str, str, torch.Tensor]] = {}
    for name, kind, out in outputs:  # in execution order: the last one at each resolution wins
        last_at[tuple(out.shape[-2:])] = (name, kind, out)
    stages = [{"name": n, "type": k, "output": o[0]} for n, k, o in last_at.values()]
    if len(stages) > MAX_STAGES:
        keep_idx = np.linspace(0, len(stages) - 1, MAX_STAGES).round().astype(int)
        stages = [stages[i] for i in sorted(set(keep_idx))]
    return stages, logits, flat.get("vector")


def look_inside(model: nn.Module, preprocess: Preprocess, classes: list[str], image: np.ndarray, *,
                max_maps: int = 8, top: int = 3, device: torch.device | str = "cpu",
                ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One forward pass of a uint8 image (C, H, W): the input as the model sees it, each stage's most
    active maps, the flattened vector, the dense layers and softmax; and the stages' raw outputs."""
    was_training = model.training
    model.eval()
    try:
        x = preprocess(torch.from_numpy(image[None]).to(device))
        stages, logits, vector = _forward(model, x)
    finally:
        model.train(was_training)
    probs = torch.softmax(logits.float(), 1)[0].cpu()
    order = probs.argsort(descending=True).tolist()
    return {
        "input": preprocess_view(preprocess, x), "input_shape": list(x.shape[1:]),
        "stages": [_stage(s, max_maps) for s in stages],
        "logits": logits.float()[0].cpu().tolist(), "probabilities": probs.tolist(), "classes": classes,
        "top": [{"class": classes[i], "index": i, "probability": float(probs[i])} for i in order[:top]],
        "flattened": None if vector is None else {"length": int(vector.shape[1]),
                                                  "values": vector[0].float().cpu().numpy()},
        "dense": [{"name": n, "in": m.in_features, "out": m.out_features}
                  for n, m in model.named_modules() if isinstance(m, nn.Linear)],
    }, stages


def explain_image(model: nn.Module, preprocess: Preprocess, classes: list[str], image: np.ndarray,
                  label: int | None = None, *, max_maps: int = 8, top: int = 3,
                  device: torch.device | str = "cpu") -> dict[str, Any]:
    """Everything the page shows, for one uint8 image (C, H, W) at the run's data size: what
    `look_inside` gives, and the first filters, pooling, a receptive field, the loss and Grad-CAM."""
    ex, stages = look_inside(model, preprocess, classes, image, max_maps=max_maps, top=top, device=device)
    ex["filters"], ex["pooling"] = _filters(model), _pooling(stages)
    if label is not None:
        p = ex["probabilities"][label]
        ex["label"] = {"class": classes[label], "index": label, "probability": p,
                       "loss": float(F.cross_entropy(torch.tensor([ex["logits"]]), torch.tensor([label])))}
    ex["receptive_field"] = _receptive_field(model, preprocess, stages)
    if last_conv(model) is not None:
        ex["grad_cam"] = [{"class": t["class"], "map": grad_cam(model, preprocess, image[None], [t["index"]], device)[0]}
                          for t in ex["top"]]
    return ex


def preprocess_view(preprocess: Preprocess, x: torch.Tensor) -> np.ndarray:
    """The model's input as a picture: resized, un-normalised back to [0, 1], (H, W) or (H, W, 3)."""
    mean = torch.tensor(preprocess.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(preprocess.std, device=x.device).view(1, -1, 1, 1)
    img = (x * std + mean)[0].clamp(0, 1).cpu().numpy().transpose(1, 2, 0)
    return img[..., 0] if img.shape[-1] == 1 else img


def _stage(stage: dict[str, Any], max_maps: int) -> dict[str, Any]:
    out = stage["output"].float().cpu()
    strength = out.flatten(1).mean(1)
    channels = strength.argsort(descending=True)[:max_maps].tolist()
    return {"name": stage["name"], "type": stage["type"], "shape": list(out.shape), "channels": channels,
            "mean_activation": [float(strength[c]) for c in channels],
            "maps": [normalise(out[c].numpy()) for c in channels]}


def _filters(model: nn.Module) -> list[np.ndarray]:
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        return []
    w = conv.weight.detach().float().cpu()
    w = w.mean(1) if w.shape[1] != 3 else w.permute(0, 2, 3, 1)
    return [normalise(f.numpy()) for f in w[:32]]


def _pooling(stages: list[dict[str, Any]], size: int = 4) -> dict[str, Any] | None:
    """A 4x4 corner of the first stage's most active map, and what 2x2 pooling makes of it."""
    if not stages:
        return None
    out = stages[0]["output"].float().cpu()
    c = int(out.flatten(1).mean(1).argmax())
    fmap = out[c]
    h, w = fmap.shape
    y, x = np.unravel_index(int(fmap.argmax()), (h, w))
    y0, x0 = min(max(0, y - size // 2), max(h - size, 0)), min(max(0, x - size // 2), max(w - size, 0))
    patch = fmap[y0:y0 + size, x0:x0 + size]
    return {"stage": stages[0]["name"], "channel": c, "at": [int(y0), int(x0)], "patch": patch.numpy(),
            "max": F.max_pool2d(patch[None, None], 2)[0, 0].numpy(),
            "avg": F.avg_pool2d(patch[None, None], 2)[0, 0].numpy(),
            "map": normalise(fmap.numpy()), "max_map": normalise(F.max_pool2d(fmap[None, None], 2)[0, 0].numpy()),
            "avg_map": normalise(F.avg_pool2d(fmap[None, None], 2)[0, 0].numpy())}


def _receptive_field(model: nn.Module, preprocess: Preprocess, stages: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The input pixels that one unit sees: the strongest unit of the stage whose units see about
    half the input (its field from summary.py)."""
    table = {r["name"]: r for r in summarize(model, (preprocess.model_channels, preprocess.input_size,
                                                     preprocess.input_size))["layers"]}
    known = [(s, table[s["name"]]["receptive_field"]) for s in stages
             if table.get(s["name"], {}).get("receptive_field")]
    if not known:
        return None
    # the stage whose units see about half the input: a field that fits in the picture, and not a pixel
    stage, rf = min(known, key=lambda sr: abs(sr[1]["size"] - preprocess.input_size / 2))
    out = stage["output"].float().cpu()
    c = int(out.flatten(1).mean(1).argmax())
    y, x = np.unravel_index(int(out[c].argmax()), tuple(out.shape[-2:]))
    cy, cx = rf["start"] + y * rf["jump"], rf["start"] + x * rf["jump"]
    half = rf["size"] / 2
    return {"stage": stage["name"], "channel": c, "unit": [int(y), int(x)], "size": rf["size"], "jump": rf["jump"],
            "box": [float(v) for v in (cx - half, cy - half, cx + half, cy + half)]}


# -- the page


def _draw_box(img: np.ndarray, box: list[float], size: int) -> Image.Image:
    im = to_pil(img).convert("RGB")
    scale = size / im.width
    im = im.resize((size, round(im.height * scale)), Image.NEAREST)
    x0, y0, x1, y1 = (max(0.0, v) * scale for v in box)
    ImageDraw.Draw(im).rectangle([x0, y0, min(x1, size - 1), min(y1, im.height - 1)], outline=(255, 40, 40), width=3)
    return im


def _overlay(img: np.ndarray, cam: np.ndarray, size: int = 160) -> Image.Image:
    base = to_pil(img).convert("RGB").resize((size, size), Image.BILINEAR)
    heat = to_pil(colour(cam)).resize((size, size), Image.BILINEAR)
    return Image.blend(base, heat, 0.45)


def _table(a: np.ndarray) -> str:
    return "<table class=num>" + "".join(
        "<tr>" + "".join(f"<td>{v:.2f}</td>" for v in row) + "</tr>" for row in a) + "</table>"


CSS = """body{font-family:system-ui,sans-serif;margin:0;background:#f5f7fa;color:#1a202c}
header{background:#2b6cb0;color:#fff;padding:16px 28px}header h1{margin:0;font-size:22px}main{padding:8px 28px;max-width:1200px}
section{background:#fff;border-radius:8px;padding:14px 18px;margin:14px 0;box-shadow:0 1px 3px rgba(0,0,0,.08)}
h2{margin:0 0 6px;font-size:17px;color:#2c5282}p.what{color:#4a5568;margin:0 0 10px}
table{border-collapse:collapse;font-size:13px}td,th{padding:3px 8px;border-bottom:1px solid #e2e8f0;text-align:right}
th:first-child,td:first-child{text-align:left}table.num td{border:1px solid #cbd5e0;text-align:center}
.row{display:flex;gap:18px;align-items:center;flex-wrap:wrap}.bar{background:#3182ce;height:12px}figure{margin:0}
figcaption{font-size:12px;color:#4a5568}"""


def render(ex: dict[str, Any], title: str, model: str = "") -> str:
    """The explain page: one section per step of the network, each opened by what it shows; layers are
    named as `model`'s (models.concat.layer_label: backbones side by side by their own names)."""
    e = html.escape

    def label(layer: str) -> str:
        return layer_label(layer, model)

    sec = []
    shape = "×".join(map(str, ex["input_shape"]))
    sec.append(("The input", "What the model takes: the image resized to its input size and normalised "
                f"with the training statistics (shown here un-normalised); a tensor of {shape}.",
                f"<img src='{png(to_pil(ex['input'], 192))}' alt='input'>"))
    if ex["filters"]:
        tiles = [to_pil(f if f.ndim == 3 else colour(f), 36) for f in ex["filters"]]
        sec.append(("First-layer filters", "Each convolution filter of the first layer, as an image: the "
                    "patterns (edges, colours, spots) it responds to.", f"<img src='{png(grid(tiles, 16))}' alt='filters'>"))
    for s in ex["stages"]:
        tiles = [to_pil(colour(m), 72) for m in s["maps"]]
        caption = ", ".join(f"#{c}" for c in s["channels"])
        sec.append((f"Feature maps after {label(s['name'])} ({s['type']}, {'×'.join(map(str, s['shape']))})",
                    f"The {len(s['maps'])} most active of its {s['shape'][0]} channels: where in the image "
                    "each detects its pattern (yellow: strong).",
                    f"<figure><img src='{png(grid(tiles, 8))}' alt='{e(s['name'])}'><figcaption>channels "
                    f"{e(caption)}</figcaption></figure>"))
    if ex["pooling"]:
        p = ex["pooling"]
        maps = "".join(f"<figure><img src='{png(to_pil(colour(p[k]), 120))}' alt='{k}'><figcaption>{t}</figcaption></figure>"
                       for k, t in (("map", "the map"), ("max_map", "2×2 max pooling"), ("avg_map", "2×2 average pooling")))
        sec.append(("Pooling", f"Pooling halves a map by keeping the largest (max) or the mean (average) of each "
                    f"2×2 block. Channel {p['channel']} of {e(label(p['stage']))}, and a 4×4 corner of it with its results:",
                    f"<div class=row>{maps}{_table(p['patch'])}<span>max →</span>{_table(p['max'])}"
                    f"<span>average →</span>{_table(p['avg'])}</div>"))
    if ex.get("receptive_field"):
        r = ex["receptive_field"]
        sec.append(("Receptive field", f"One unit of {e(label(r['stage']))} (channel {r['channel']}, position "
                    f"{tuple(r['unit'])}) sees only the input pixels in the red square: {r['size']:.0f} pixels wide; "
                    f"its neighbours' squares are {r['jump']:.0f} pixels apart.",
                    f"<img src='{png(_draw_box(ex['input'], r['box'], 256))}' alt='receptive field'>"))
    if ex["flattened"] is not None:
        v = ex["flattened"]["values"]
        strip = to_pil(colour(normalise(v[None, :].repeat(12, 0))), 0).resize((min(900, max(200, len(v))), 24))
        dense = " → ".join(f"{d['in']}→{d['out']}" for d in ex["dense"])
        sec.append(("Flattened, then dense layers", f"The last maps become one vector of {v.size} numbers "
                    f"(below, as colours); dense layers ({e(dense)}) turn it into one score per class.",
                    f"<img src='{png(strip)}' alt='flattened vector'>"))
    rows = "".join(
        f"<tr><td>{e(ex['classes'][i])}</td><td>{ex['logits'][i]:.3f}</td><td>{math.exp(ex['logits'][i] - max(ex['logits'])):.4f}</td>"
        f"<td data-probability='{p:.6f}'>{100 * p:.2f}%</td><td><div class=bar style='width:{200 * p:.0f}px'></div></td></tr>"
        for i, p in sorted(enumerate(ex["probabilities"]), key=lambda t: -t[1]))
    sec.append(("Softmax", "Scores (logits) become probabilities: each exp(score − max score), divided by their "
                f"sum. The probabilities add up to {100 * sum(ex['probabilities']):.2f}%.",
                f"<table><tr><th>class</th><th>logit</th><th>exp(logit − max)</th><th>probability</th><th></th></tr>{rows}</table>"))
    if "label" in ex:
        lab = ex["label"]
        sec.append(("Cross-entropy loss", f"With the true class {e(lab['class'])}, the loss is −log(p) = "
                    f"−log({lab['probability']:.4f}) = {lab['loss']:.4f}: 0 when the model is sure and right, "
                    "large when it is sure and wrong.", ""))
    if ex.get("grad_cam"):
        figs = "".join(f"<figure><img src='{png(_overlay(ex['input'], g['map']))}' alt='grad-cam {e(g['class'])}'>"
                       f"<figcaption>{e(g['class'])}</figcaption></figure>" for g in ex["grad_cam"])
        sec.append(("Grad-CAM", "Where the evidence for each of the top classes lies (yellow), from the last "
                    "convolution's gradients.", f"<div class=row>{figs}</div>"))
    body = "".join(f"<section><h2>{e(t)}</h2><p class=what>{e(w)}</p>{c}</section>" for t, w, c in sec)
    top = ex["top"][0]
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>cnnkit explain: {e(title)}</title>"
            f"<style>{CSS}</style></head><body><header><h1>{e(title)}</h1><p>predicted {e(top['class'])} "
            f"({100 * top['probability']:.1f}%)</p></header><main>{body}</main></body></html>")


def explain_run(run_dir: Path, image: Path, label: str | None = None, device: str = "cpu",
                out: Path | None = None) -> tuple[Path, dict[str, Any]]:
    """`cnnkit explain`: write RUN/explain/<image name>.html; returns its path and the numbers."""
    from cnnkit.data.images import decode_image
    from cnnkit.errors import ConfigError
    from cnnkit.runs import load_run

    run = load_run(run_dir, "best", device)
    pre = run.preprocess
    index = None
    if label is not None:
        if label not in run.classes:
            raise ConfigError(f"--label {label!r} is not a class of this run; its classes: {', '.join(run.classes)}")
        index = run.classes.index(label)
    pixels = decode_image(image, pre.data_size, pre.data_channels)
    ex = explain_image(run.model, pre, run.classes, pixels, index, device=device)
    path = out or Path(run_dir) / "explain" / f"{Path(image).stem}.html"
    write_bytes_atomic(path, render(ex, f"{Path(image).name} through {Path(run_dir).name}", run.meta["model"]).encode())
    return path, ex


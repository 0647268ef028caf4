"""What a trained model gets right and wrong: calibration, confusions, worst mistakes,
robustness to corruptions, Grad-CAM and first-layer filters. Numbers only; report.py draws."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cnnkit import augment
from cnnkit.evaluate import classification_metrics
from cnnkit.inference import predict_logits
from cnnkit.preprocess import Preprocess
from cnnkit.progress import track


def calibration(logits: torch.Tensor, labels: np.ndarray, bins: int = 15) -> dict[str, Any]:
    """Expected calibration error and the reliability diagram's bins (confidence = top probability)."""
    probs = torch.softmax(logits, 1)
    conf, pred = probs.max(1)
    correct = (pred == torch.as_tensor(labels)).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    rows, ece = [], 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf.double() > lo) & (conf.double() <= hi)
        n = int(in_bin.sum())
        if n:
            acc, mean_conf = float(correct[in_bin].mean()), float(conf[in_bin].double().mean())
            ece += abs(acc - mean_conf) * n / len(conf)
        else:
            acc = mean_conf = None
        rows.append({"low": float(lo), "high": float(hi), "count": n, "accuracy": acc, "confidence": mean_conf})
    return {"ece": ece, "bins": rows}


def confused_pairs(cm: list[list[int]], classes: list[str], top: int = 5) -> list[dict[str, Any]]:
    m = np.asarray(cm)
    pairs = [(int(m[i, j]), i, j) for i in range(len(m)) for j in range(len(m)) if i != j and m[i, j] > 0]
    pairs.sort(reverse=True)
    return [{"true": classes[i], "predicted": classes[j], "true_index": i, "predicted_index": j, "count": n}
            for n, i, j in pairs[:top]]


def worst_mistakes(logits: torch.Tensor, labels: np.ndarray, top: int = 16) -> list[dict[str, Any]]:
    """Wrong predictions with the largest loss: index, true, predicted, probability of the prediction."""
    y = torch.as_tensor(labels)
    losses = F.cross_entropy(logits, y, reduction="none")
    wrong = (logits.argmax(1) != y).nonzero().squeeze(1)
    order = wrong[losses[wrong].argsort(descending=True)][:top]
    probs = torch.softmax(logits, 1)
    return [{"index": int(i), "true": int(y[i]), "predicted": int(logits[i].argmax()),
             "probability": float(probs[i].max()), "loss": float(losses[i])} for i in order]


# -- robustness: fixed, deterministic corruptions at increasing severity


def _rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    p = augment.identity_params(len(x))
    p["angle"] = torch.full((len(x),), np.deg2rad(degrees), dtype=torch.float64)
    return augment.warp(x, augment.affine_matrix(**p), "zero")


def _shift(x: torch.Tensor, pixels: float) -> torch.Tensor:
    p = augment.identity_params(len(x))
    p["tx"] = p["ty"] = torch.full((len(x),), float(pixels), dtype=torch.float64)
    return augment.warp(x, augment.affine_matrix(**p), "zero")


def _noise(x: torch.Tensor, std: float) -> torch.Tensor:
    return (x + std * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur whose kernel reaches as many sigmas out as a 5-px kernel at sigma 1.5 (the strongest
    severity at 32 px), so a larger image's scaled blur has the same shape."""
    kernel = max(5, 2 * round(BLUR_REACH * sigma) + 1)
    return augment.blur(x, torch.Generator(), sigma=(sigma, sigma), kernel=kernel)


def _jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    out = []
    for img in (x * 255).round().byte().permute(0, 2, 3, 1).numpy():
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, format="JPEG", quality=quality)
        arr = np.asarray(Image.open(buf))
        out.append(arr[..., None] if arr.ndim == 2 else arr)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255


CORRUPTIONS: dict[str, tuple[Callable[[torch.Tensor, float], torch.Tensor], list[float], str]] = {
    "rotation": (_rotate, [5, 10, 20], "degrees"),
    "shift": (_shift, [1, 2, 3], "pixels"),
    "brightness": (lambda x, s: (x * s).clamp(0, 1), [0.7, 1.3, 1.6], "factor"),
    "contrast": (lambda x, s: ((x - x.mean(dim=(1, 2, 3), keepdim=True)) * s + x.mean(dim=(1, 2, 3), keepdim=True)).clamp(0, 1),
                 [0.7, 0.5, 0.3], "factor"),
    "gaussian noise": (_noise, [0.04, 0.08, 0.16], "std"),
    "blur": (_blur, [0.5, 1.0, 1.5], "sigma"),
    "jpeg": (_jpeg, [75, 40, 15], "quality"),
}

BLUR_REACH = 2 / 1.5  # a 5-px kernel's reach at sigma 1.5, in sigmas
# Severities in pixels are set for images of 28-32 px (Fashion-MNIST, CIFAR-10): a larger image's are scaled
# with its side, or a 3-px shift and a 1.5-px blur of a 260-px photo would test nothing (flowers12's report
# read 95.8% under every shift and 95.8-97.9% under every blur, one image of 48 either way, as clean).
SPATIAL_UNITS, REFERENCE_SIZE = ("pixels", "sigma"), 32

# Model evaluations of each image in the robustness section: as it is, and each corruption's severities.
ROBUSTNESS_PASSES = 1 + sum(len(severities) for _, severities, _ in CORRUPTIONS.values())
# The section's figures are accuracies over all its images, to show which corruptions break the model: 24 images
# (one is about 4 points) show a drop of 10 points or more, and cost half of what 48 did. At 48 (one pass over
# flowers12's 960 images, 4 a class) the section took 35 s of a 135-s photo run whose choice of backbone took 74.
ROBUSTNESS_SHARE = 0.5
ROBUSTNESS_MIN_PER_CLASS = 2
ROBUSTNESS_MIN_SAMPLES = 24


def robustness_sample_count(asked: int, test_images: int, run_images: int, num_classes: int) -> int:
    """How many test images the robustness section uses: the recipe's `asked`, at most the test
    split, and at most what costs about ROBUSTNESS_SHARE of one more pass over the run's images
    (training and test; each sample is evaluated ROBUSTNESS_PASSES times), but no fewer than
    ROBUSTNESS_MIN_PER_CLASS a class and ROBUSTNESS_MIN_SAMPLES in all. A photo set of 960 images
    through a 260-px backbone so keeps its report to seconds, not minutes."""
    in_proportion = max(int(run_images * ROBUSTNESS_SHARE) // ROBUSTNESS_PASSES,
                        ROBUSTNESS_MIN_PER_CLASS * num_classes, ROBUSTNESS_MIN_SAMPLES)
    return max(0, min(asked, test_images, in_proportion))


def class_balanced_order(labels: np.ndarray) -> np.ndarray:
    """Indices of `labels` taking each class in turn (each class's images in their own order), so
    that any prefix holds the classes about equally: a folder's test split is sorted by class, and
    its first 100 images would be its first few classes alone."""
    labels = np.asarray(labels)
    rank = np.empty(len(labels), dtype=np.int64)  # each image's place among its class's images
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        rank[where] = np.arange(len(where))
    return np.lexsort((labels, rank))  # by rank, then class


@torch.no_grad()
def robustness(model: nn.Module, preprocess: Preprocess, images: np.ndarray, labels: np.ndarray, classes: list[str],
               device: torch.device | str = "cpu", **inference: Any) -> dict[str, Any]:
    """Accuracy on the images as they are, and under each corruption at each severity (in pixels scaled
    to the images' side: SPATIAL_UNITS); `inference` (precision, channels_last, batch_size) as for
    `predict_logits`, the run's own by the report."""
    x = preprocess.to_float(torch.from_numpy(images))
    scale = max(1.0, x.shape[-1] / REFERENCE_SIZE)

    def accuracy(batch: torch.Tensor) -> float:
        u8 = (batch * 255).round().clamp(0, 255).byte()
        return classification_metrics(predict_logits(model, preprocess, u8, device=device, **inference),
                                      labels, classes)["accuracy"]

    results = {"samples": int(len(labels)), "clean": accuracy(x), "corruptions": []}
    conditions = [(name, fn, level, s, unit) for name, (fn, severities, unit) in CORRUPTIONS.items()
                  for level, s in enumerate(severities, 1)]
    for name, fn, level, s, unit in track(conditions, f"report: robustness on {len(labels)} images"):
        value = round(s * scale, 2) if unit in SPATIAL_UNITS else s
        results["corruptions"].append({"name": name, "severity": level, "value": value, "unit": unit,
                                       "accuracy": accuracy(fn(x, value))})
    return results


# -- what the network looks at


def last_conv(model: nn.Module) -> nn.Module | None:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1] if convs else None


def grad_cam(model: nn.Module, preprocess: Preprocess, images: np.ndarray, target: list[int] | None = None,
             device: torch.device | str = "cpu") -> np.ndarray:
    """Grad-CAM maps (N, H, W) in [0, 1] at the images' own size, for the predicted class (or `target`).

    The last convolution's activations are weighted by the mean gradient of the class score in
    each channel, summed, rectified and upsampled (Selvaraju et al., 2017).
    """
    layer = last_conv(model)
    if layer is None:
        raise ValueError("Grad-CAM needs a convolutional layer")
    saved: dict[str, torch.Tensor] = {}

    def keep(_, __, output):
        output.retain_grad()
        saved["act"] = output

    handle = layer.register_forward_hook(keep)
    was_training = model.training
    model.eval()
    try:
        # The input asks for gradients so the activations have them even when every parameter
        # is frozen (a backbone trained with --strategy frozen).
        x = preprocess(torch.from_numpy(images).to(device)).requires_grad_(True)
        logits = model(x)
        cls = torch.as_tensor(target, device=logits.device) if target is not None else logits.argmax(1)
        model.zero_grad(set_to_none=True)
        logits.gather(1, cls[:, None]).sum().backward()
        act, grad = saved["act"], saved["act"].grad
        cam = F.relu((grad.mean(dim=(2, 3), keepdim=True) * act).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        lo = cam.flatten(1).min(1).values[:, None, None]
        hi = cam.flatten(1).max(1).values[:, None, None]
        return ((cam - lo) / (hi - lo).clamp_min(1e-8)).detach().cpu().numpy()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def first_layer_filters(model: nn.Module) -> np.ndarray | None:
    """The first convolution's kernels as images (out, k, k, 1 or 3), each scaled to [0, 1]."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        return None
    w = conv.weight.detach().float().cpu()
    if w.shape[1] != 3:
        w = w.mean(1, keepdim=True)
    lo = w.flatten(1).min(1).values[:, None, None, None]
    hi = w.flatten(1).max(1).values[:, None, None, None]
    return ((w - lo) / (hi - lo).clamp_min(1e-8)).permute(0, 2, 3, 1).numpy()

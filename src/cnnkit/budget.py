"""`--time-budget`: fit the number of steps so that a whole run, report included, ends in time.

The plan is made after the first few steps (their rate, and that of evaluating a batch), and made again after the first and the second epoch (measured epoch, validation and
between-epoch times; when fine-tuning, the first two that trained every layer that will train).
After that it is made again, shorter, whenever the last epochs' times say the plan would end past
`REPLAN_PAST` of the budget: a machine slower than its first epochs showed, or slowing down (see
`recent_epoch_s`). A plan
is a number of steps: whole epochs and the part of one more that fits (or of the first, where not
even one epoch fits). The schedule follows the plan, so a shorter budget means a shorter, complete
schedule (the learning rate still decays to its end), not a run cut off midway. A run whose next
(part of an) epoch would overrun its budget would end past `REPLAN_PAST` too, so it is re-planned,
and the new plan may end it at that epoch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from cnnkit.errors import ConfigError

UNITS = {"s": 1, "m": 60, "h": 3600}
# After training, beyond the model evaluations (seconds): the test's confusion-matrix plot, with
# matplotlib's import (measured 1.2 s on the Zen 3), and the report's plots, Grad-CAM and HTML (4-8 s).
TEST_FIXED_S = 2.0
REPORT_FIXED_S = 8.0
# Test-time augmentation's extra views and the report's robustness section improve what a run
# reports, not the model: under a budget they get at most this share of it (fewer views, then fewer
# robustness samples), and the rest trains. On a CPU without bf16, cifar10-fast's six test views and
# 500 robustness samples take 160 s, over half of a 5-minute budget.
EXTRAS_SHARE = 0.1
TTA_FALLBACK = {"flip-shift": "flip", "flip": "none", "shift": "none"}
MARGIN = 0.95  # plan to end 5% early: epoch times vary between epochs
# An epoch this much slower than the recent epochs' mean is a slower machine, not noise (see recent_epoch_s).
STEP_CHANGE = 1.25
# Re-plan, shorter, only when a plan's end drifts past this: a plan fills its margin to the step,
# and epoch-to-epoch noise should not shorten it after every epoch.
REPLAN_PAST = (1 + MARGIN) / 2


def parse_duration(text: str) -> float:
    """Seconds in '90s', '10m', '1h30m', '2.5m' or a plain number of seconds."""
    t = text.strip().lower()
    try:
        return _positive(float(t), text)
    except ValueError:
        pass
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smh])", t)
    if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([smh])", "", t).strip():
        raise ConfigError(f"time budget {text!r}: write it like 90s, 10m or 1h30m")
    return _positive(sum(float(n) * UNITS[u] for n, u in parts), text)


def _positive(seconds: float, text: str) -> float:
    if not seconds > 0 or math.isinf(seconds):
        raise ConfigError(f"time budget {text!r} must be a positive duration")
    return seconds


@dataclass
class Costs:
    """Seconds per epoch of training (at full size) and of validation, and for everything after
    training. `epoch_weights`: what an epoch costs against a full-size one, for the first epochs
    under progressive resizing (its pixels: (size / input size) ** 2); later epochs weigh 1."""

    epoch_s: float
    val_s: float
    final_s: float
    epoch_weights: tuple[float, ...] = ()

    def training_s(self, step: int, total_steps: int, steps_per_epoch: int) -> float:
        """Seconds to train from step `step` to step `total_steps`, epoch by epoch."""
        seconds, s = 0.0, step
        while s < total_steps:
            epoch = s // steps_per_epoch + 1
            steps = min(total_steps, epoch * steps_per_epoch) - s
            seconds += steps * epoch_weight(self.epoch_weights, epoch) * self.epoch_s / steps_per_epoch
            s += steps
        return seconds


def epoch_weight(weights: tuple[float, ...], epoch: int) -> float:
    """What epoch `epoch` (1-based) costs against a full-size one (see Costs)."""
    return weights[epoch - 1] if epoch <= len(weights) else 1.0


def fit_extras(budget_s: float, eval_image_s: float, test_images: int, tta: str, views: Callable[[str], int],
               robustness_samples: int, robustness_passes: int, least_samples: int) -> tuple[str, int]:
    """The test-time augmentation (`views` counts its views) and the number of robustness samples
    (0: no report) whose extra evaluations fit in EXTRAS_SHARE of the budget: fewer views first, then
    fewer samples, though not below `least_samples` (one a class: the section's curves need every
    class). A floor of 100 samples whatever the share took 22 s of a 1-minute budget of a linear probe
    on a folder of 5,000 photos (a 224-px backbone's forward passes, the Zen 3): its head then learnt
    from 128 of 3,600 training images."""
    allowed = EXTRAS_SHARE * budget_s / eval_image_s  # images
    while test_images * (views(tta) - 1) > allowed and tta in TTA_FALLBACK:
        tta = TTA_FALLBACK[tta]
    held = math.floor((allowed - test_images * (views(tta) - 1)) / robustness_passes)
    return tta, min(robustness_samples, max(least_samples, held))


def fit_to_left(left_s: float, eval_image_s: float, test_images: int, tta: str, views: Callable[[str], int],
                robustness_samples: int, robustness_passes: int, least_samples: int, report: bool) -> tuple[str, int]:
    """After a linear probe's choice, which computed every training row: the test-time augmentation and
    robustness samples whose evaluations fit in the `left_s` seconds the budget leaves (the test's and
    report's own work included): fewer views first, then fewer samples, though not below `least_samples`
    (one a class: the section's curves need every class)."""
    least = min(robustness_samples, least_samples) if report else 0

    def needs(tta: str, samples: int) -> float:
        return final_seconds(test_images * views(tta) + robustness_passes * samples, eval_image_s, report)

    while needs(tta, least) > left_s and tta in TTA_FALLBACK:
        tta = TTA_FALLBACK[tta]
    spare = left_s - needs(tta, 0)
    return tta, min(robustness_samples, max(least, math.floor(spare / (robustness_passes * eval_image_s))))


def estimate_costs(step_s: float, steps_per_epoch: int, eval_image_s: float, val_images: int,
                   final_images: int, report: bool, epoch_weights: tuple[float, ...] = ()) -> Costs:
    """From the time of one full-size training step and of evaluating one image; `final_images`
    counts every image the test evaluation and the report run through the model."""
    return Costs(step_s * steps_per_epoch, val_images * eval_image_s, final_seconds(final_images, eval_image_s, report),
                 epoch_weights)


def final_seconds(final_images: int, eval_image_s: float, report: bool) -> float:
    """The test evaluation and the report: their model evaluations, and their own work."""
    return final_images * eval_image_s + TEST_FIXED_S + REPORT_FIXED_S * report


def probe_end_s(elapsed_s: float, done: int, total: int, image_s: float, fit_image_s: float, final_s: float) -> float:
    """When a linear probe `done` images into its training features ends if it takes `total`: the
    features left (`image_s`: an image's forward passes), the head's fit on all (`fit_image_s` an image;
    its fixed part in `final_s`), the test and report (`final_s`)."""
    return elapsed_s + (total - done) * image_s + total * fit_image_s + final_s


def probe_images(budget_s: float, elapsed_s: float, done: int, image_s: float, fit_image_s: float,
                 final_s: float) -> int:
    """How many training images a linear probe can take in all, `done` of them already: the most whose
    end (`probe_end_s`) is within the budget's margin; no fewer than `done`."""
    spare = MARGIN * budget_s - elapsed_s - final_s + done * image_s
    return max(done, math.floor(spare / (image_s + fit_image_s)))


def calibration_window(steps_per_epoch: int, settled_step: int) -> tuple[int, int]:
    """The steps of the first epoch to time: after step `first` up to step `last`, about a tenth
    of the epoch. `first` is `settled_step` (where the trainable layers stop changing) when the
    epoch has room for the window after it, else 0."""
    window = max(3, steps_per_epoch // 10)
    first = settled_step if settled_step + window <= steps_per_epoch else 0
    return first, min(steps_per_epoch, first + window)


def first_settled_epoch(steps_per_epoch: int, settled_step: int) -> int:
    """The first epoch (1-based) that trains throughout as the rest of the run will."""
    return math.ceil(settled_step / steps_per_epoch) + 1


def recent_epoch_s(times: list[float], last: int = 3) -> float:
    """Seconds per epoch from here on: the mean of the `last` settled epochs' times, so that one
    fast or slow epoch (they vary by 20% on a laptop) does not move the plan alone; but the last
    epoch's own time where it is over STEP_CHANGE times that mean. Such an epoch says the machine
    slowed down (another program, a hot CPU); a mean that took two more epochs to follow it made
    plans that ended past the budget until a re-plan at the last epoch's end stopped the run there,
    its schedule cut off with the learning rate at 8-23% of its peak (tests/test_fast.py's budget test)."""
    recent = times[-last:]
    mean = sum(recent) / len(recent)
    return times[-1] if times[-1] > STEP_CHANGE * mean else mean


def replan_after_epoch(epoch: int, steps_per_epoch: int, settled_step: int) -> bool:
    """Whether the time of epoch `epoch` should re-plan the run: yes for the first two epochs that
    trained throughout as the rest of the run will (from the second the time between epochs is
    known too). An epoch that began with cheaper, head-only steps would plan too many epochs, so
    such an epoch re-plans only while the plan rests on head-only steps (the first epoch had no
    room to time later ones, see `calibration_window`); its time is closer to the truth than theirs."""
    first_settled = first_settled_epoch(steps_per_epoch, settled_step)
    if epoch >= first_settled:
        return epoch <= first_settled + 1
    return calibration_window(steps_per_epoch, settled_step)[0] != settled_step


def run_end_s(elapsed_s: float, step: int, total_steps: int, steps_per_epoch: int, costs: Costs) -> float:
    """When a run `elapsed_s` seconds and `step` steps in ends if it trains to step `total_steps`:
    the steps left, a validation at the end of every epoch they end (a last, partial epoch too),
    then the test and report."""
    validations = -(-total_steps // steps_per_epoch) - step // steps_per_epoch
    return elapsed_s + costs.training_s(step, total_steps, steps_per_epoch) + validations * costs.val_s + costs.final_s


def fit_steps(budget_s: float, elapsed_s: float, step: int, steps_per_epoch: int, costs: Costs) -> int:
    """How many steps in all fit in the budget, `step` steps and `elapsed_s` seconds into the run:
    the most that end (see `run_end_s`) within its margin, so whole epochs and the part of one more
    that fits, not a whole epoch's worth of the budget left unused. At least one step more when
    the run is within an epoch (or has not begun), else the run may end here."""
    least = step + 1 if step % steps_per_epoch or step == 0 else step
    step_s = costs.epoch_s / steps_per_epoch * min((1.0, *costs.epoch_weights))  # the cheapest step bounds it
    lo, hi = least, least + max(0, math.ceil((MARGIN * budget_s - elapsed_s) / step_s))
    while lo < hi:  # the end time grows with the steps: the last that fits, by bisection
        mid = (lo + hi + 1) // 2
        if run_end_s(elapsed_s, step, mid, steps_per_epoch, costs) <= MARGIN * budget_s:
            lo = mid
        else:
            hi = mid - 1
    return lo


def describe_plan(steps: int, steps_per_epoch: int) -> str:
    """'3 epochs of 268 steps and 120 more', '150 of the first epoch's 268 steps' and the like."""
    epochs, part = divmod(steps, steps_per_epoch)
    if not epochs:
        return f"{part} of the first epoch's {steps_per_epoch} steps"
    whole = f"{epochs} epoch{'s' * (epochs > 1)} of {steps_per_epoch} steps"
    return f"{whole} and {part} more" if part else whole

"""The hooks of an ordinary run, one concern each (the time budget has a module of its own).

Order matters where hooks read what an earlier one decided at the same point: at an epoch's end
the budget re-plans (which may make it the last epoch), Lookahead hands over its slow weights on
the last epoch, the best-epoch rule marks an improvement and may request a stop, the metrics are
written, and the checkpointer saves what they decided. `standard_hooks` builds them in that order.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cnnkit import distributed, progress
from cnnkit.checkpoint import save_checkpoint
from cnnkit.errors import ConfigError
from cnnkit.finetune import Unfreezer
from cnnkit.lookahead import Lookahead
from cnnkit.training.loop import EpochEnd, Hook, Loop
from cnnkit.training.schedule import set_rates, warmup_steps

if TYPE_CHECKING:
    from cnnkit.training.build import Setup

log = logging.getLogger(__name__)


class LrSchedule(Hook):
    """Before each step: every group's rate from the recipe's schedule over the run's length."""

    def before_step(self, loop: Loop) -> None:
        cfg, n = loop.setup.cfg, len(loop.loader)
        set_rates(loop.optimizer.param_groups, loop.state.step, loop.total_steps,
                  warmup_steps(cfg.warmup_epochs, n, loop.total_steps), cfg.schedule, n, loop.state.lr_scale)


class Unfreeze(Hook):
    """Fine-tuning strategies: which layer groups train at each step (see cnnkit.finetune)."""

    def __init__(self, unfreezer: Unfreezer, strategy: str):
        self.unfreezer, self.strategy = unfreezer, strategy

    def before_step(self, loop: Loop) -> None:
        if self.unfreezer.update(loop.state.step):
            loop.train_mode()
            log.info("step %d: training %s", loop.state.step, self.unfreezer.describe())


class LookaheadHook(Hook):
    """airbench's Lookahead (cnnkit.lookahead): slow weights after each step; at the end of the
    run's last epoch the model takes them, also when a budget ended the run before its last step."""

    name = "lookahead"

    def __init__(self, model: torch.nn.Module):
        self.lookahead = Lookahead(model)

    def after_step(self, loop: Loop) -> None:
        if loop.last_loss is not None:  # a skipped (non-finite) step changed nothing
            self.lookahead.after_step(loop.model, loop.state.step, loop.total_steps)

    def on_epoch_end(self, loop: Loop, end: EpochEnd) -> None:
        if end.epoch == loop.epochs:
            self.lookahead.finish(loop.model)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.lookahead.slow)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in self.lookahead.slow.items():
            v.copy_(state[k])


class BestEpoch(Hook):
    """The best epoch by validation accuracy, and early stopping after `patience` epochs without gain."""

    name = "best"

    def __init__(self, patience: int | None, final_fit: bool = False):
        self.patience, self.final_fit = patience, final_fit
        self.best_val_accuracy, self.best_epoch, self.bad_epochs = -1.0, 0, 0

    def on_epoch_end(self, loop: Loop, end: EpochEnd) -> None:
        accuracy = end.record["val_accuracy"]
        self.bad_epochs = 0 if accuracy > self.best_val_accuracy else self.bad_epochs + 1
        # A tie is no progress for early stopping, but its later weights become the best: as good on
        # validation and trained longer (under a decaying schedule, at a lower rate). A GPU
        # fmnist-fast run tied at epochs 10 and 11 and was tested with epoch 10's weights.
        end.improved = accuracy >= self.best_val_accuracy or self.final_fit  # a final fit tests its last epoch
        if end.improved:
            self.best_val_accuracy, self.best_epoch = accuracy, end.epoch
        if self.patience and self.bad_epochs >= self.patience and not self.final_fit:
            loop.request_stop(f"early stopping: no better validation accuracy for {self.bad_epochs} epochs")

    def state_dict(self) -> dict[str, Any]:
        return {"best_val_accuracy": self.best_val_accuracy, "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_val_accuracy, self.best_epoch, self.bad_epochs = (
            state["best_val_accuracy"], state["best_epoch"], state["bad_epochs"])


class StopAfterEpoch(Hook):
    """Ends the run after epoch `epoch`, its learning-rate schedule still planned for all its epochs:
    the run then has the weights --strategy auto's folds measured best at that epoch of that schedule."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_end(self, loop: Loop, end: EpochEnd) -> None:
        if end.epoch >= self.epoch and end.epoch < loop.epochs:
            loop.request_stop(f"stopped after epoch {end.epoch} of {loop.epochs} (stop_after_epoch: the folds' "
                              "held-out accuracy was best there)")


class MetricsLog(Hook):
    """metrics.jsonl (a line an epoch), the progress bar, the epoch's log line and TensorBoard."""

    def __init__(self, run_dir: Path, is_main: bool, tensorboard: bool):
        self.run_dir, self.is_main = run_dir, is_main
        self.tensorboard = _tensorboard_writer(run_dir) if tensorboard and is_main else None
        self.bar: Any = None

    def on_epoch_start(self, loop: Loop, epoch: int) -> None:
        self.bar = progress.make_progress()
        self.bar.__enter__()
        self.task = self.bar.add_task(f"epoch {epoch}/{loop.epochs}", total=loop.epoch_batches(epoch),
                                      completed=loop.state.batch, info="")

    def after_step(self, loop: Loop) -> None:
        s = loop.state
        if s.batch % 20 == 0 or s.batch == len(loop.loader) or s.step >= loop.total_steps:  # the loop brought the totals in
            seen = max(s.epoch_seen, 1)
            self.bar.update(self.task, completed=s.batch, description=f"epoch {s.epoch + 1}/{loop.epochs}",
                            info=f"loss {s.epoch_loss_sum / seen:.4f}  acc {100 * s.epoch_correct / seen:.2f}%  "
                                 f"{s.epoch_seen / max(s.epoch_time_s, 1e-9):.0f} img/s")

    def on_epoch_end(self, loop: Loop, end: EpochEnd) -> None:
        self._close_bar()
        r = end.record
        if self.is_main:
            append_metrics(self.run_dir, r)
        if self.tensorboard is not None:
            for key, value in r.items():
                if key not in ("epoch", "step"):
                    tag = key.replace("_", "/", 1) if key.startswith(("train_", "val_")) else key
                    self.tensorboard.add_scalar(tag, value, end.epoch)
            self.tensorboard.flush()
        log.info("epoch %d/%d  loss %.4f  acc %.2f%%  val_loss %.4f  val_acc %.2f%%%s  %.0f img/s  %.1fs",
                 end.epoch, loop.epochs, r["train_loss"], 100 * r["train_accuracy"], r["val_loss"],
                 100 * r["val_accuracy"], " *" if end.improved else "", r["train_images_per_s"], r["epoch_time_s"])

    def on_run_end(self, loop: Loop) -> None:
        self._close_bar()
        if self.tensorboard is not None:
            self.tensorboard.close()

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


class Checkpointer(Hook):
    """The `best` checkpoint when validation improves; the resumable `last` one every
    `checkpoint_every_epochs`, at the end, on a stop, and mid-epoch every `checkpoint_every_minutes`;
    and SIGINT/SIGTERM, which save `last` after the current step (a second Ctrl-C stops at once).
    In distributed runs only rank 0 writes (the weights are the same on every rank)."""

    def __init__(self, setup: Setup):
        self.setup = setup
        self.last_save = time.perf_counter()
        self.previous_handlers: dict[int, Any] = {}

    def save(self, loop: Loop, name: str) -> None:
        """`last` carries what resuming needs (optimiser, the loop's and hooks' state, RNG states);
        `best` the weights and the loop's counters."""
        setup = self.setup
        if name == "last":
            self.last_save = time.perf_counter()
        if not setup.dist.is_main:
            return
        meta = {**setup.meta, "record": setup.record.to_dict()}
        if name != "last":
            meta["state"] = asdict(loop.state)
            save_checkpoint(setup.run_dir / "checkpoints" / name, loop.model, meta)
            return
        saved = loop.state_dict()
        hooks, tensors = _split_tensors(saved["hooks"])
        meta.update(state=saved["state"], hooks=hooks)
        save_checkpoint(setup.run_dir / "checkpoints" / name, loop.model, meta, loop.optimizer,
                        {**saved["rng"], **tensors})

    def due(self) -> bool:
        minutes = self.setup.cfg.checkpoint_every_minutes
        return minutes is not None and time.perf_counter() - self.last_save >= 60 * minutes

    def on_run_start(self, loop: Loop) -> None:
        if threading.current_thread() is threading.main_thread():
            self.previous_handlers = {s: signal.signal(s, lambda signum, _: self._on_os_signal(loop, signum))
                                      for s in (signal.SIGINT, signal.SIGTERM)}

    def _on_os_signal(self, loop: Loop, signum: int) -> None:
        if loop.signal is not None:  # a second Ctrl-C: stop now, without a checkpoint
            raise KeyboardInterrupt
        loop.interrupt(signum)
        log.warning("%s received: saving a checkpoint after this step (press Ctrl-C again to stop at once)",
                    signal.Signals(signum).name)

    def after_step(self, loop: Loop) -> None:
        if self.due() and loop.state.batch < len(loop.loader) and loop.state.step < loop.total_steps:
            self.save(loop, "last")

    def on_epoch_end(self, loop: Loop, end: EpochEnd) -> None:
        if end.improved:
            self.save(loop, "best")
        every = self.setup.cfg.checkpoint_every_epochs
        if end.epoch % every == 0 or end.epoch == loop.epochs or loop.stop_reason or self.due():
            self.save(loop, "last")

    def on_signal(self, loop: Loop, signum: int) -> None:
        self.save(loop, "last")
        distributed.barrier(self.setup.dist)  # no rank leaves (and makes torchrun stop the rest) before rank 0 saved

    def on_run_end(self, loop: Loop) -> None:
        for s, handler in self.previous_handlers.items():
            signal.signal(s, handler)
        self.previous_handlers = {}


def _split_tensors(hooks: dict[str, dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    """Hooks' states as JSON for the checkpoint's header and tensors named `hook.key` for its body."""
    plain: dict[str, dict[str, Any]] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, state in hooks.items():
        plain[name] = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
        tensors.update({f"{name}.{k}": v for k, v in state.items() if isinstance(v, torch.Tensor)})
    return plain, tensors


def saved_loop_state(meta: dict[str, Any], extra: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What `Loop.load_state_dict` takes, from a `last` checkpoint's metadata and extra tensors."""
    hooks = {name: dict(state) for name, state in meta.get("hooks", {}).items()}
    if "hooks" not in meta and "best_epoch" in meta["state"]:  # a checkpoint from before the hooks (stop 19)
        hooks["best"] = {k: meta["state"][k] for k in ("best_val_accuracy", "best_epoch", "bad_epochs")}
    for key, value in extra.items():
        name, _, rest = key.partition(".")
        if name != "rng":
            hooks.setdefault(name, {})[rest] = value
    return {"state": meta["state"], "rng": {k: v for k, v in extra.items() if k.startswith("rng.")}, "hooks": hooks}


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def _tensorboard_writer(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("--tensorboard true needs the tensorboard package: pip install 'cnnkit[tensorboard]'") from None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))

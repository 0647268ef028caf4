"""Interruptions, divergence, full disks and corrupt files: nothing is lost, nothing bad is loaded."""

import errno
import json
import random
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnnkit import checkpoint as checkpoint_module
from cnnkit.checkpoint import load_checkpoint
from cnnkit.config import apply_overrides, load_recipe
from cnnkit.data import load_dataset
from cnnkit.data.images import decode_image
from cnnkit.errors import DataError, ImageDecodeError
from cnnkit.fileio import StorageError
from cnnkit.training import Hook, TrainingError, prepare, run_training, train

pytestmark = pytest.mark.slow

COMMON = ["--recipe", "seed-fmnist", "--max-train-samples", "1500", "--max-eval-samples", "300", "--epochs", "2",
          "--batch-size", "8", "--seed", "3", "--deterministic", "true", "--report", "false"]


def cnnkit_train(*args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cnnkit", "train", *COMMON, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def comparable(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if "time" not in k and "per_s" not in k} for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run that interrupted-and-resumed runs must reproduce exactly."""
    out = tmp_path_factory.mktemp("ref")
    proc = cnnkit_train("--output", str(out), "--name", "ref")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return out / "ref"


def resume(run_dir) -> None:
    proc = subprocess.run([sys.executable, "-m", "cnnkit", "train", "--resume", str(run_dir)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def assert_same_run(a, b) -> None:
    wa = load_checkpoint(a / "checkpoints" / "last").model
    wb = load_checkpoint(b / "checkpoints" / "last").model
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "final weights differ"
    assert comparable(a) == comparable(b)


def test_sigkill_at_a_random_moment_then_resume_equals_uninterrupted(reference, tmp_path):
    proc = cnnkit_train("--output", str(tmp_path), "--name", "killed", "--checkpoint-every-minutes", "0")
    last = tmp_path / "killed" / "checkpoints" / "last.safetensors"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline:
        time.sleep(0.05)
    delay = random.uniform(0, 2.0)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = load_checkpoint(last.with_suffix("")).meta["state"]  # whatever moment the kill hit, it loads
    resume(tmp_path / "killed")
    assert_same_run(reference, tmp_path / "killed"), f"killed {delay:.2f}s after the first checkpoint, at {state}"


def test_sigterm_saves_a_checkpoint_mid_epoch(reference, tmp_path):
    proc = cnnkit_train("--output", str(tmp_path), "--name", "termed")
    deadline = time.time() + 120
    metrics = tmp_path / "termed" / "config.json"
    while not metrics.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # config.json is written just before the first step: this lands in epoch 1
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived (a much faster machine)")
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Resume with: cnnkit train --resume" in err and "Traceback" not in err
    state = load_checkpoint(tmp_path / "termed" / "checkpoints" / "last").meta["state"]
    assert state["batch"] > 0 or state["epoch"] > 0
    resume(tmp_path / "termed")
    assert_same_run(reference, tmp_path / "termed")


def small_config(tmp_path, **kw):
    return apply_overrides(load_recipe("fmnist-baseline"), {
        "max_train_samples": 1000, "max_eval_samples": 200, "epochs": 2, "output": str(tmp_path), "name": "nan", **kw})


class NanAt(Hook):
    """The loss of optimiser step `step` (1-based) becomes NaN."""

    def __init__(self, setup, step: int):
        self.setup, self.step, self.loss_fn = setup, step, setup.step.loss_fn

    def before_step(self, loop):
        nan = loop.state.step + 1 == self.step
        self.setup.step.loss_fn = (lambda *a: self.loss_fn(*a) * float("nan")) if nan else self.loss_fn


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer, _ = prepare(small_config(tmp_path))
    steps_per_epoch = len(trainer.loader)
    with pytest.raises(TrainingError, match=f"loss became nan at step {steps_per_epoch + 5} \\(epoch 2, batch 5\\)"):
        run_training(trainer, extra_hooks=[NanAt(trainer, steps_per_epoch + 5)])
    last = load_checkpoint(tmp_path / "nan" / "checkpoints" / "last")
    assert last.meta["state"]["epoch"] == 1  # the good epoch-1 checkpoint, untouched
    assert all(torch.isfinite(v).all() for v in last.model.values())


def test_nan_loss_can_be_skipped_with_a_lower_learning_rate(tmp_path):
    trainer, _ = prepare(small_config(tmp_path, on_nonfinite="skip"))
    result = run_training(trainer, extra_hooks=[NanAt(trainer, 7)])
    assert result.summary["skipped_steps"] == 1 and result.state.lr_scale == 0.5
    assert all(torch.isfinite(v).all() for v in load_checkpoint(result.run_dir / "checkpoints" / "last").model.values())


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    result = train(small_config(tmp_path, epochs=1))
    stem = result.run_dir / "checkpoints" / "last"
    before = stem.with_suffix(".safetensors").read_bytes()

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "save_file", full_disk)
    with pytest.raises(StorageError, match="no space left.*previous version of the file is intact"):
        train(None, resume=result.run_dir, overrides={"epochs": 2})
    assert stem.with_suffix(".safetensors").read_bytes() == before
    assert not list(stem.parent.glob(".*.tmp"))
    load_checkpoint(stem)


def test_truncated_archive_and_corrupt_cache(tmp_path, fmnist_images, isolated_home):
    from PIL import Image

    x, y = fmnist_images
    for i in range(12):
        d = tmp_path / "tree" / f"class{y[i] % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i]).save(d / f"{i}.png")
    with tarfile.open(tmp_path / "a.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "tree", arcname="tree")
    data = (tmp_path / "a.tar.gz").read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.tar.gz: cannot read the archive"):
        load_dataset("folder", tmp_path / "cut.tar.gz", image_size=16)

    first = load_dataset("folder", tmp_path / "a.tar.gz", image_size=16)
    (cache,) = (isolated_home / "cache").glob("*.safetensors")
    raw = bytearray(cache.read_bytes())
    raw[-10] ^= 0xFF  # a flipped bit inside the pixel data: the format alone would not notice
    cache.write_bytes(bytes(raw))
    again = load_dataset("folder", tmp_path / "a.tar.gz", image_size=16)
    assert (again.splits["train"].images == first.splits["train"].images).all()


def test_single_image_class_is_a_clear_error(tmp_path, fmnist_images):
    from PIL import Image

    x, _ = fmnist_images
    for name, n in (("many", 6), ("lonely", 1)):
        (tmp_path / name).mkdir()
        for i in range(n):
            Image.fromarray(x[i]).save(tmp_path / name / f"{i}.png")
    with pytest.raises(DataError, match=r"lonely \(1\) have fewer than 2 training images"):
        train(apply_overrides(load_recipe("fmnist-baseline"), {
            "dataset": "folder", "data_dir": str(tmp_path), "image_size": 28, "epochs": 1, "output": str(tmp_path / "runs")}))


def _valid_images() -> list[bytes]:
    import io

    from PIL import Image

    out = []
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "WEBP"):
        buf = io.BytesIO()
        Image.new("RGB", (17, 9), (200, 30, 60)).save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


VALID = _valid_images()


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(base=st.sampled_from(VALID), cuts=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
       truncate=st.integers(0, 10_000), junk=st.binary(max_size=64))
def test_decoder_fuzz_only_raises_its_own_error(base, cuts, truncate, junk):
    data = bytearray(base)
    for pos, value in cuts:
        if data:
            data[pos % len(data)] = value
    data = bytes(data[: truncate or len(data)]) + junk
    try:
        out = decode_image(data, 8, 3)
    except ImageDecodeError:
        return
    assert out.shape == (3, 8, 8) and out.dtype.name == "uint8"


@settings(max_examples=200, deadline=2000)
@given(st.binary(max_size=512))
def test_decoder_fuzz_random_bytes(data):
    with pytest.raises(ImageDecodeError):
        decode_image(b"\x89PNG\r\n\x1a\n" + data if data[:1] == b"\x00" else data, 8, 1)

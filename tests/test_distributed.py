"""Data-parallel training with torchrun and Gloo: two CPU processes against one."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

ARGS = ["--recipe", "fmnist-baseline", "--max-train-samples", "4000", "--max-eval-samples", "1000", "--epochs", "1",
        "--batch-size", "64", "--seed", "7", "--report", "false"]


def cnnkit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnkit", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    two = cnnkit("train", *ARGS, "--nproc", "2", "--output", str(out), "--name", "two")
    assert two.returncode == 0, two.stderr[-3000:]
    one = cnnkit("train", *ARGS, "--output", str(out), "--name", "one")
    assert one.returncode == 0, one.stderr[-3000:]
    return out, two


def test_two_processes_train_like_one(runs):
    out, two = runs
    assert "distributed: 2 processes (Gloo), global batch 64 = 32 per process" in two.stderr
    assert sorted(p.name for p in out.iterdir()) == ["one", "two"]  # rank 1 made no folder of its own
    m2 = [json.loads(line) for line in (out / "two" / "metrics.jsonl").read_text().splitlines()]
    m1 = [json.loads(line) for line in (out / "one" / "metrics.jsonl").read_text().splitlines()]
    assert len(m2) == 1 and m2[0]["step"] == m1[0]["step"]  # one line per epoch, the same number of global steps
    assert abs(m2[0]["val_accuracy"] - m1[0]["val_accuracy"]) < 0.03
    assert two.stdout.count("Run folder:") == 1  # one report, from rank 0


def test_checkpoint_of_two_processes_gives_the_same_results_in_one(runs):
    out, _ = runs
    written = json.loads((out / "two" / "evaluation.json").read_text())
    again = cnnkit("--quiet", "evaluate", str(out / "two"), "--json", "--device", "cpu")
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)
    assert result["confusion_matrix"] == written["confusion_matrix"]
    assert result["loss"] == pytest.approx(written["loss"], abs=1e-6)
    ckpt = json.loads((out / "two" / "checkpoints" / "best.json").read_text())
    assert "module." not in json.dumps(ckpt)


def test_resume_under_two_processes(runs):
    out, _ = runs
    resumed = cnnkit("--quiet", "train", "--nproc", "2", "--resume", str(out / "two"), "--epochs", "2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    lines = (out / "two" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]

"""`cnnkit tune`: a search space from the recipe, checked before any trial; trials as run folders
reported to an Optuna study; pruning through the loop's hooks; a study that survives SIGKILL; and
two processes sharing a PostgreSQL study (where .ci/run started a server)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cnnkit.cli import main
from cnnkit.config import apply_overrides, load_recipe
from cnnkit.errors import ConfigError
from cnnkit.training import train
from cnnkit.tune import ReportToStudy, parse_space, toml_value

optuna = pytest.importorskip("optuna")

TINY = ["--max-train-samples", "500", "--max-eval-samples", "200", "--epochs", "2", "--report", "false"]
SPACE = '[tune]\nlr = {low = 0.0005, high = 0.005, log = true}\nlabel_smoothing = {low = 0.0, high = 0.2}\n'


@pytest.mark.parametrize("table,message", [
    ({"weight_decy": {"low": 0.1, "high": 1.0}}, "no recipe field (did you mean weight_decay"),
    ({"lr": {"low": 1.0, "high": 0.1}}, "low < high"),
    ({"lr": {"low": 0.0, "high": 0.1, "log": True}}, "low must be positive"),
    ({"batch_size": {"low": 0, "high": 64}}, "batch_size = 0 is not a valid setting"),
    ({"augment": {"choices": []}}, "non-empty list"),
    ({"optimizer": {"choices": ["adam", "rmsprop"]}}, "optimizer = 'rmsprop' is not a valid setting"),
    ({"lr": 0.1}, "needs {low"),
])
def test_a_bad_space_is_a_clear_error(table, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("{", r"\{")):
        parse_space(table, load_recipe("fmnist-baseline"), "test")


def test_every_recipe_ships_a_valid_space_and_still_loads():
    from cnnkit.config import recipe_names
    from cnnkit.tune import load_space

    spaces = {name: load_space(name) for name in recipe_names()}  # every built-in recipe has one, and it is valid
    assert all(spaces.values()) and {"lr", "augment"} <= {p.name for p in spaces["fmnist-quick"]}
    assert all(load_recipe(name) for name in recipe_names())  # [tune] is no field of a run


def test_toml_values_round_trip():
    import tomllib

    data = {"a": 1.5e-05, "b": "x \"y\"", "c": True, "d": [1, 2], "e": {"widths": [32, 64]}, "f": [{"op": "hflip"}]}
    text = "".join(f"{k} = {toml_value(v)}\n" for k, v in data.items())
    assert tomllib.loads(text) == data


class AlwaysPrune:
    """A trial whose study prunes it at its first report."""

    def __init__(self):
        self.reports = []

    def report(self, value, step):
        self.reports.append((step, value))

    def should_prune(self):
        return True


@pytest.mark.slow
def test_a_pruned_trial_stops_before_its_last_epoch(tmp_path):
    trial = AlwaysPrune()
    cfg = apply_overrides(load_recipe("fmnist-baseline"), {"max_train_samples": 500, "max_eval_samples": 200,
                                                           "epochs": 4, "report": False, "output": str(tmp_path),
                                                           "name": "pruned"})
    summary = train(cfg, hooks=[ReportToStudy(trial)]).summary
    assert summary["epochs_run"] == 1 < 4 and summary["status"] == "stopped early"
    assert [step for step, _ in trial.reports] == [1] and 0 <= trial.reports[0][1] <= 1


@pytest.mark.slow
def test_a_tiny_study_writes_its_database_best_recipe_and_report(tmp_path, capsys):
    space = tmp_path / "space.toml"
    space.write_text(SPACE)
    args = ["tune", "--recipe", "fmnist-baseline", "--space", str(space), "--trials", "3", "--output", str(tmp_path),
            "--name", "s", *TINY]
    assert main(args) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "s"
    assert (folder / "study.db").is_file() and "cnnkit train --recipe" in out
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{folder / 'study.db'}")
    assert len(study.trials) == 3 and len({json.dumps(t.params, sort_keys=True) for t in study.trials}) == 3
    best = load_recipe(str(folder / "best.toml"))  # a recipe cnnkit train takes as it is
    assert best.lr == pytest.approx(study.best_params["lr"]) and best.epochs == 2 and best.max_train_samples == 500
    assert all((folder / "trials" / f"trial-{n:03d}" / "summary.json").is_file() for n in range(3))
    page = (folder / "report.html").read_text()
    assert page.count("<tr><td>") == 3 and "optimisation history" in page and "data:image/png;base64," in page
    assert main([*args, "--final"]) == 0  # the study has its 3 trials: the same command adds none ...
    assert len(optuna.load_study(study_name="s", storage=f"sqlite:///{folder / 'study.db'}").trials) == 3
    final = json.loads((folder / "final" / "summary.json").read_text())  # ... and --final trains the best once more
    trial = json.loads((folder / "trials" / f"trial-{study.best_trial.number:03d}" / "summary.json").read_text())
    assert final["train_samples"] == trial["train_samples"] + trial["val_samples"]  # on train + validation
    assert final["best_epoch"] == final["epochs_run"] == 2  # the last epoch is tested
    assert f"test accuracy {100 * final['test_accuracy']:.2f}%" in capsys.readouterr().out


def test_trials_write_their_reports_only_when_asked_and_the_final_fit_writes_its_own(tmp_path):
    space = tmp_path / "space.toml"
    space.write_text(SPACE)
    args = ["tune", "--recipe", "fmnist-baseline", "--space", str(space), "--output", str(tmp_path), "--name", "s",
            *TINY[:-2], "--epochs", "1", "--report", "true"]
    assert main([*args, "--trials", "1", "--final"]) == 0
    trials = tmp_path / "s" / "trials"
    assert (trials / "trial-000" / "summary.json").is_file() and not (trials / "trial-000" / "report.html").exists()
    assert (tmp_path / "s" / "final" / "report.html").is_file()
    assert "href='trials/trial-000/summary.json'" in (tmp_path / "s" / "report.html").read_text()
    assert main([*args, "--trials", "2", "--trial-reports"]) == 0
    assert (trials / "trial-001" / "report.html").is_file()
    assert "href='trials/trial-001/report.html'" in (tmp_path / "s" / "report.html").read_text()


def test_a_continued_study_does_not_draw_its_first_trials_settings_again(tmp_path):
    space = tmp_path / "space.toml"
    space.write_text(SPACE)
    args = ["tune", "--recipe", "fmnist-baseline", "--space", str(space), "--output", str(tmp_path), "--name", "s",
            *TINY[:-4], "--epochs", "1", "--report", "false"]
    assert main([*args, "--trials", "2"]) == 0
    assert main([*args, "--trials", "4"]) == 0  # the same command, for two more
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 's' / 'study.db'}")
    assert len({json.dumps(t.params, sort_keys=True) for t in study.trials}) == 4


def test_processes_started_together_on_one_study_draw_settings_of_their_own(tmp_path):
    from cnnkit.trial_sampler import TrialSeededTPE

    storage = f"sqlite:///{tmp_path / 'study.db'}"

    def opened(seed=0):  # a process opening the study, its sampler seeded by the same --seed
        return optuna.create_study(storage=storage, study_name="s", direction="maximize", load_if_exists=True,
                                   sampler=TrialSeededTPE(seed))

    a, b = opened(), opened()  # both before either trial: a sampler seeded once, alike, drew the same here
    ta, tb = a.ask(), b.ask()
    lr_a, lr_b = ta.suggest_float("lr", 1e-4, 1e-1, log=True), tb.suggest_float("lr", 1e-4, 1e-1, log=True)
    assert (ta.number, tb.number) == (0, 1) and lr_a != lr_b
    a.tell(ta, 0.5)
    b.tell(tb, 0.6)
    again = optuna.create_study(study_name="t", direction="maximize", sampler=TrialSeededTPE(0))  # same seed, alone
    first = [again.ask().suggest_float("lr", 1e-4, 1e-1, log=True) for _ in range(2)]
    assert first == [lr_a, lr_b]  # the same draws, trial by trial: a study is still the same for the same --seed


def test_the_next_trial_is_planned_by_the_longest_after_the_first_which_fills_the_caches():
    from cnnkit.tune import _expected_trial_s

    assert _expected_trial_s(None, []) is None
    assert _expected_trial_s(None, [130.0]) == 130.0  # nothing else to go by
    assert _expected_trial_s(None, [130.0, 40.0, 55.0]) == 55.0
    assert _expected_trial_s("2m", [130.0, 40.0]) == 120.0


OPEN_TOGETHER = """
import pathlib, sys, time
from cnnkit.tune import _storage
folder = pathlib.Path(sys.argv[1])
(folder / f"ready-{sys.argv[2]}").touch()
while not (folder / "go").exists():
    time.sleep(0.001)
start = float((folder / "go").read_text())
for k in range(12):  # twelve new databases, each opened by every process at the same moment
    time.sleep(max(0.0, start + 0.3 * k - time.time()))
    _storage(f"sqlite:///{folder / f'db-{k}.sqlite'}", 2)
"""


def test_processes_opening_new_sqlite_studies_together_all_open_them(tmp_path):
    # SQLite's "table ... already exists" while another process makes the tables: opened again, not a crash
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_TOGETHER, str(tmp_path), str(n)], stderr=subprocess.PIPE)
             for n in range(3)]
    deadline = time.time() + 120
    while len(list(tmp_path.glob("ready-*"))) < 3 and time.time() < deadline:
        time.sleep(0.05)
    (tmp_path / "go.tmp").write_text(str(time.time() + 0.5))
    (tmp_path / "go.tmp").rename(tmp_path / "go")  # whole: a process must not read it half-written
    assert [(p.wait(timeout=120), p.stderr.read().decode()[-500:]) for p in procs] == [(0, "")] * 3


def test_a_storage_that_cannot_be_opened_is_a_clear_error(tmp_path):
    from cnnkit.tune import _storage

    with pytest.raises(ConfigError, match=r"could not open the study's storage sqlite:///.*missing.*folder writable"):
        _storage(f"sqlite:///{tmp_path / 'missing' / 'study.db'}", 2)


@pytest.mark.slow
def test_sigkill_during_a_trial_then_the_same_command_continues_the_study(tmp_path):
    space = tmp_path / "space.toml"
    space.write_text(SPACE)
    cmd = [sys.executable, "-m", "cnnkit", "--quiet", "tune", "--recipe", "fmnist-baseline", "--space", str(space),
           "--trials", "3", "--output", str(tmp_path), "--name", "k", "--grace-period", "2",
           *TINY[:-4], "--epochs", "6", "--report", "false"]
    storage = f"sqlite:///{tmp_path / 'k' / 'study.db'}"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    states: list[str] = []
    while time.time() < deadline:  # kill it while a trial runs after one has finished
        time.sleep(0.5)
        if proc.poll() is not None:  # it ended on its own: say why rather than wait out the deadline
            pytest.fail(f"cnnkit tune exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        try:
            states = [t.state.name for t in optuna.load_study(study_name="k", storage=storage).trials]
        except Exception:  # the study is not created yet
            continue
        if "COMPLETE" in states and states[-1] == "RUNNING":
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert "COMPLETE" in states and states[-1] == "RUNNING", states
    kept = [t.params for t in optuna.load_study(study_name="k", storage=storage).trials if t.state.name == "COMPLETE"]
    time.sleep(3)  # past the grace period: the killed trial's heartbeat is stale
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    trials = optuna.load_study(study_name="k", storage=storage).trials
    assert [t.params for t in trials if t.state.name == "COMPLETE"][: len(kept)] == kept  # nothing lost
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials) == 3
    assert [t.state.name for t in trials].count("FAIL") == 1  # the killed trial, marked failed


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("CNNKIT_TEST_POSTGRES"), reason="no PostgreSQL server (CI starts one)")
def test_two_processes_share_one_postgresql_study(tmp_path):
    url = os.environ["CNNKIT_TEST_POSTGRES"]
    name = f"shared-{os.getpid()}-{int(time.time())}"
    space = tmp_path / "space.toml"
    space.write_text(SPACE)
    procs = [subprocess.Popen([sys.executable, "-m", "cnnkit", "--quiet", "tune", "--recipe", "fmnist-baseline",
                               "--space", str(space), "--trials", "4", "--storage", url, "--output",
                               str(tmp_path / f"machine{i}"), "--name", name, *TINY],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in (1, 2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    trials = optuna.load_study(study_name=name, storage=url).trials
    assert len(trials) == 4 and len({t.number for t in trials}) == 4
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 4  # each its own settings
    ran = [{p.name for p in (tmp_path / f"machine{i}" / name / "trials").iterdir()} for i in (1, 2)]
    assert ran[0] and ran[1] and not ran[0] & ran[1]  # each machine ran trials of its own


@pytest.mark.slow
def test_a_study_killed_in_its_last_trial_gets_that_trial_back(tmp_path):
    # what a SIGKILL in the last trial leaves: N-1 trials complete, one RUNNING whose heartbeat has stopped
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    from cnnkit.tune import _storage

    folder = tmp_path / "d"
    folder.mkdir()
    storage = _storage(f"sqlite:///{folder / 'study.db'}", 2)
    study = optuna.create_study(study_name="d", storage=storage, direction="maximize")
    dists = {"lr": FloatDistribution(0.0005, 0.005, log=True), "label_smoothing": FloatDistribution(0.0, 0.2)}
    for value, lr in ((0.5, 0.001), (0.6, 0.002)):
        study.add_trial(create_trial(params={"lr": lr, "label_smoothing": 0.1}, distributions=dists, value=value))
    dead = study.ask()
    storage.record_heartbeat(dead._trial_id)
    time.sleep(3)  # past the grace period
    space = tmp_path / "space.toml"
    space.write_text(SPACE)
    assert main(["--quiet", "tune", "--recipe", "fmnist-baseline", "--space", str(space), "--trials", "3",
                 "--output", str(tmp_path), "--name", "d", "--grace-period", "2", *TINY]) == 0
    states = [t.state for t in optuna.load_study(study_name="d", storage=f"sqlite:///{folder / 'study.db'}").trials]
    assert states.count(TrialState.FAIL) == 1 and states.count(TrialState.COMPLETE) == 3

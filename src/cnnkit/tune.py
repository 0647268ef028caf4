"""`cnnkit tune`: hyperparameter search with Optuna, under a time budget, that a crash does not lose.

Each trial is an ordinary `cnnkit train` run folder (DIR/NAME/trials/trial-NNN; its report.html
only with `trial_reports`), trained with the trial's settings and, with a trial budget, fitted to
it by `--time-budget`, so that trials of different settings compete on equal time. Every epoch's
validation accuracy goes to the study through a hook (`ReportToStudy`); the pruner stops hopeless
trials. Selection is on validation only. The study lives in DIR/NAME/study.db (SQLite) or in
PostgreSQL (`--storage`), so a killed search started again continues (Optuna's heartbeat fails
the trial that was running), and several machines can share one study. What Optuna does
(sampling, pruning, storage, plots) is Optuna's; cnnkit adds the search space in the recipe, the
budget, and the run folders.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import time
import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnkit.config import Config, apply_overrides, load_recipe
from cnnkit.errors import CnnkitError, ConfigError
from cnnkit.fileio import write_bytes_atomic
from cnnkit.runtime import settings_for_this_cpu
from cnnkit.training import Hook, train
from cnnkit.training.loop import EpochEnd, Loop

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Param:
    """One searched field: a float or int range (log-uniform with `log`), or choices."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple[Any, ...] | None = None

    def suggest(self, trial: Any) -> Any:
        if self.choices is not None:  # Optuna stores scalars: lists and dicts go as JSON text
            picked = trial.suggest_categorical(self.name, [_encode(c) for c in self.choices])
            return _decode(picked)
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)


def _encode(v: Any) -> Any:
    return json.dumps(v) if isinstance(v, (list, dict)) else v


def _decode(v: Any) -> Any:
    return json.loads(v) if isinstance(v, str) and v[:1] in "[{" else v


def load_space(recipe: str, space_file: Path | None = None) -> list[Param]:
    """The search space: the `[tune]` table of the recipe file (or of `space_file`), checked."""
    if space_file is not None:
        table = _read_toml(space_file).get("tune", None)
        if table is None:
            raise ConfigError(f"{space_file}: no [tune] table")
    else:
        table = _recipe_table(recipe)
    if not table:
        raise ConfigError(f"recipe {recipe} has no [tune] table; give a search space with --space FILE")
    return parse_space(table, load_recipe(recipe), str(space_file or f"recipe {recipe}"))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: not a readable TOML file ({e})") from None


def _recipe_table(recipe: str) -> dict[str, Any]:
    from importlib import resources

    path = Path(recipe)
    if recipe.endswith(".toml") and path.is_file():
        return _read_toml(path).get("tune", {})
    text = (resources.files("cnnkit.recipes") / f"{recipe}.toml").read_text()
    return tomllib.loads(text).get("tune", {})


def parse_space(table: dict[str, Any], base: Config, where: str) -> list[Param]:
    """Parameters from `{field: {low, high, log} | {choices: [...]}}`; unknown fields, empty or
    upside-down ranges, and values the configuration refuses are errors before any trial runs."""
    names = [f.name for f in dataclasses.fields(Config)]
    params = []
    for name, spec in table.items():
        if name not in names:
            close = difflib.get_close_matches(name, names, 1)
            raise ConfigError(f"{where} [tune]: {name} is no recipe field" + (f" (did you mean {close[0]}?)" if close else ""))
        if not isinstance(spec, dict) or not ({"choices"} <= set(spec) or {"low", "high"} <= set(spec)):
            raise ConfigError(f"{where} [tune]: {name} needs {{low = ..., high = ...}} or {{choices = [...]}}")
        if "choices" in spec:
            if not isinstance(spec["choices"], list) or not spec["choices"]:
                raise ConfigError(f"{where} [tune]: {name}'s choices must be a non-empty list")
            param = Param(name, choices=tuple(spec["choices"]))
            samples = list(spec["choices"])
        else:
            low, high, log_scale = spec["low"], spec["high"], bool(spec.get("log", False))
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or not low < high:
                raise ConfigError(f"{where} [tune]: {name} needs numbers low < high; got {low} and {high}")
            if log_scale and low <= 0:
                raise ConfigError(f"{where} [tune]: {name} is log-uniform, so low must be positive; got {low}")
            integer = isinstance(low, int) and isinstance(high, int)
            param = Param(name, float(low), float(high), log_scale, integer)
            samples = [low, high]
        for value in samples:  # both ends and every choice must make a valid configuration
            try:
                apply_overrides(base, {name: value})
            except ConfigError as e:
                raise ConfigError(f"{where} [tune]: {name} = {value!r} is not a valid setting: {e}") from None
        params.append(param)
    return params


class ReportToStudy(Hook):
    """Each epoch's validation accuracy to the study; a stop when the pruner says so."""

    def __init__(self, trial: Any):
        self.trial, self.pruned = trial, False

    def on_epoch_end(self, loop: Loop, end: EpochEnd) -> None:
        self.trial.report(end.record["val_accuracy"], end.epoch)
        if self.trial.should_prune():
            self.pruned = True
            loop.request_stop(f"pruned by the study after epoch {end.epoch}")


@dataclass
class TuneResult:
    folder: Path
    best_value: float | None
    best_params: dict[str, Any]
    trials: list[dict[str, Any]]
    recipe_path: Path | None
    final: dict[str, Any] | None = None  # --final: the best settings trained on train + validation, tested once


def tune(recipe: str, overrides: dict[str, Any], *, folder: Path, trials: int | None = None,
         budget_s: float | None = None, trial_budget: str | None = None, storage: str | None = None,
         space: Path | None = None, seed: int = 0, grace_period_s: int = 60, final: bool = False,
         trial_reports: bool = False) -> TuneResult:
    """Run trials until `trials` are done (all processes on the study together) or the next would
    not fit in `budget_s`; write best.toml and the tune report. Returns what the study holds.
    Trials write no report.html unless `trial_reports` (on flowers12 a photo trial's report took
    about 36 s, its features cached the rest 37-66 s); the final fit writes its own."""
    import optuna

    from cnnkit.trial_sampler import TrialSeededTPE

    if trials is None and budget_s is None:
        raise ConfigError("cnnkit tune needs --trials N, --time-budget D, or both")
    started = time.perf_counter()
    base = settings_for_this_cpu(apply_overrides(load_recipe(recipe), overrides), overrides)
    params = load_space(recipe, space)
    folder.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        storage=_storage(storage or f"sqlite:///{folder / 'study.db'}", grace_period_s),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2),
        study_name=folder.name, direction="maximize", load_if_exists=True)
    study.sampler = TrialSeededTPE(seed)  # each trial's settings its own, in a continued or shared study too
    durations: list[float] = []
    while _more_wanted(study, trials):
        left = None if budget_s is None else budget_s - (time.perf_counter() - started)
        expected = _expected_trial_s(trial_budget, durations)
        # a trial may overrun its budget by a few percent, and the best recipe and report follow the last
        if left is not None and (left <= 0 or (expected is not None and 1.05 * expected + 10 > left)):
            log.info("tune: the next trial (about %.0f s) would not fit in the %.0f s left", expected or 0, max(left, 0))
            break
        t0 = time.perf_counter()
        study.optimize(lambda trial: _objective(trial, base, params, folder, trial_budget, trial_reports),
                       n_trials=1, catch=(CnnkitError,))
        durations.append(time.perf_counter() - t0)
    rows = _trial_rows(study, folder)
    recipe_path = write_best_recipe(study, base, params, folder) if _completed(study) else None
    best = study.best_trial if _completed(study) else None
    final_run = _final_fit(base, best, folder, trial_budget) if final and best is not None else None
    write_report(study, rows, folder, final_run)
    return TuneResult(folder, best.value if best else None, best.params if best else {}, rows, recipe_path, final_run)


def _final_fit(base: Config, best: Any, folder: Path, trial_budget: str | None) -> dict[str, Any]:
    """The best settings once more, on the training and validation images together, tested once:
    the figure to report, where the trials' validation accuracies only chose."""
    cfg = apply_overrides(base, {**{k: _decode(v) for k, v in best.params.items()}, "final_fit": True,
                                 "output": str(folder), "name": "final",
                                 **({"time_budget": trial_budget} if trial_budget else {})})
    summary = train(cfg).summary
    log.info("tune: final fit of trial %d on train + validation: test accuracy %.2f%%", best.number,
             100 * summary["test_accuracy"])
    return {"trial": best.number, "run": str(folder / "final"), "test_accuracy": summary["test_accuracy"],
            "test_samples": summary["test_samples"]}


def _storage(url: str, grace_period_s: int) -> Any:
    """Optuna's RDB storage with a heartbeat: a trial whose process died (SIGKILL, a lost machine)
    is marked failed once its heartbeat is `grace_period_s` old, and the search goes on."""
    import optuna
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import IntegrityError, OperationalError

    for attempt in range(3):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, heartbeat_interval=max(1, grace_period_s // 4),
                                                  grace_period=grace_period_s)
        except ImportError as e:  # the database's driver
            raise ConfigError(f"--storage {url.split('://')[0]}:// needs its driver: pip install "
                              f"'cnnkit[postgres]' for PostgreSQL ({e})") from None
        except (IntegrityError, OperationalError) as e:
            # processes started together on a new database: another one was making the tables (PostgreSQL:
            # a unique violation; SQLite: "table ... already exists"). Opened again, the tables are there.
            if attempt == 2:
                where = make_url(url).render_as_string(hide_password=True)
                raise ConfigError(f"could not open the study's storage {where}: {e.orig} (is the server up, "
                                  "the folder writable, the URL right?)") from None
            time.sleep(1 + attempt)
    raise AssertionError("unreachable")


def _completed(study: Any) -> list[Any]:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def _more_wanted(study: Any, trials: int | None) -> bool:
    import optuna
    from optuna.trial import TrialState

    if trials is None:
        return True
    # a trial whose process died (its heartbeat older than the grace period) is failed first: counted as
    # running, a study killed in its last trial would never get it back
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    # failed trials (bad settings, a process killed) do not count towards N, but N failures end the search
    counted = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    return len(counted) < trials and len(failed) < trials


def _expected_trial_s(trial_budget: str | None, durations: list[float]) -> float | None:
    """How long the next trial may take: its trial budget, else the longest trial so far, leaving
    out the first once another has run: the first also fills the caches every later trial reads
    (decoded images; a photo probe's features of every backbone, most of its time)."""
    from cnnkit.budget import parse_duration

    if trial_budget:
        return parse_duration(trial_budget)
    return max(durations[1:] or durations) if durations else None


def _objective(trial: Any, base: Config, params: list[Param], folder: Path, trial_budget: str | None,
               trial_reports: bool) -> float:
    import optuna

    values = {p.name: p.suggest(trial) for p in params}
    name = f"trial-{trial.number:03d}"
    run_overrides = {**values, "output": str(folder / "trials"), "name": name, "recipe": base.recipe,
                     **({"time_budget": trial_budget} if trial_budget else {}),
                     **({} if trial_reports else {"report": False})}
    trial.set_user_attr("run", str(folder / "trials" / name))
    try:
        cfg = apply_overrides(base, run_overrides)
    except ConfigError as e:
        trial.set_user_attr("error", str(e))
        raise
    hook = ReportToStudy(trial)
    try:
        result = train(cfg, hooks=[hook])
    except CnnkitError as e:  # recorded with its reason, and the search goes on
        trial.set_user_attr("error", str(e))
        raise
    if hook.pruned:
        raise optuna.TrialPruned(f"pruned after epoch {result.summary['epochs_run']}")
    return float(result.summary["best_val_accuracy"])


def _trial_rows(study: Any, folder: Path) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({"number": t.number, "state": t.state.name.lower(), "value": t.value,
                     "params": {k: _decode(v) for k, v in t.params.items()},
                     "epochs": max(t.intermediate_values, default=None), "run": t.user_attrs.get("run"),  # None: a probe's
                     "error": t.user_attrs.get("error"),
                     "seconds": round(t.duration.total_seconds(), 1) if t.duration else None})
    return rows


def write_best_recipe(study: Any, base: Config, params: list[Param], folder: Path) -> Path:
    """DIR/NAME/best.toml: the base recipe with the best trial's settings, for `cnnkit train --recipe`."""
    best = study.best_trial
    cfg = apply_overrides(base, {k: _decode(v) for k, v in best.params.items()})
    data = {k: v for k, v in cfg.to_dict().items() if v is not None and k not in ("output", "name")}
    data["recipe"] = f"{base.recipe}-tuned"
    data["description"] = (f"{base.recipe} with the settings of trial {best.number} of `cnnkit tune` "
                           f"(validation accuracy {100 * best.value:.2f}%)")
    path = folder / "best.toml"
    write_bytes_atomic(path, ("".join(f"{k} = {toml_value(v)}\n" for k, v in data.items())).encode())
    return path


def toml_value(v: Any) -> str:
    """A TOML value for a configuration's field (strings, numbers, booleans, lists, tables)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{v} has no TOML form")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string: the same escapes as JSON
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise ConfigError(f"{v!r} has no TOML form")


def write_report(study: Any, rows: list[dict[str, Any]], folder: Path, final: dict[str, Any] | None = None) -> Path:
    """DIR/NAME/report.html: the trials, and Optuna's plots of the search where it has enough trials."""
    import html
    import io

    from cnnkit.explain import png  # data: URIs, so the page is one file
    from cnnkit.plotting import png_bytes, pyplot

    e = html.escape
    plots = []
    if len(_completed(study)) >= 2:
        import optuna.visualization.matplotlib as vis
        from PIL import Image

        pyplot()
        for title, fn in (("optimisation history", vis.plot_optimization_history),
                          ("parameter importances", vis.plot_param_importances), ("slices", vis.plot_slice)):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                    ax = fn(study)
                fig = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
                fig.set_size_inches(9, 4)
                plots.append((title, Image.open(io.BytesIO(png_bytes(fig)))))
            except (ValueError, RuntimeError) as err:  # too few trials for this plot
                log.info("tune report: no %s (%s)", title, err)
    def value(r: dict[str, Any]) -> str:
        return "" if r["value"] is None else f"{100 * r['value']:.2f}%"

    table = "".join(
        f"<tr><td>{r['number']}</td><td>{e(r['state'])}</td><td>{value(r)}</td><td>{'-' if r['epochs'] is None else r['epochs']}</td>"
        f"<td>{e(json.dumps(r['params']))}</td><td>{r['seconds'] or ''}</td>"
        f"<td>{_link(r, folder)}</td><td>{e(r['error'] or '')}</td></tr>" for r in rows)
    figures = "".join(f"<h2>{e(t)}</h2><img src='{png(im)}' alt='{e(t)}'>" for t, im in plots)
    page = (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>cnnkit tune: {e(folder.name)}</title>"
            "<style>body{font-family:system-ui,sans-serif;margin:24px;color:#1a202c}table{border-collapse:collapse;"
            "font-size:13px}td,th{padding:3px 8px;border-bottom:1px solid #e2e8f0;text-align:left}img{max-width:100%}"
            f"</style></head><body><h1>cnnkit tune: {e(folder.name)}</h1><p>{len(rows)} trials; validation "
            "accuracy is what the study maximises (the test split is never used to choose)</p>"
            + (f"<p>Final fit of trial {final['trial']} on train + validation: test accuracy "
               f"<b>{100 * final['test_accuracy']:.2f}%</b> on {final['test_samples']} images "
               "(<a href='final/report.html'>its report</a>)</p>" if final else "")
            + "<table><tr><th>trial</th>"
            "<th>state</th><th>validation</th><th>epochs</th><th>settings</th><th>seconds</th><th>run</th><th>error</th>"
            f"</tr>{table}</table>{figures}</body></html>")
    path = folder / "report.html"
    write_bytes_atomic(path, page.encode())
    return path


def _link(row: dict[str, Any], folder: Path) -> str:
    """The trial's report, or without one (no --trial-reports) its summary.json; nothing for a trial that
    wrote neither, or whose folder is another process's (a shared study's trial under its own --output)."""
    run = row["run"]
    if not run or not Path(run).is_relative_to(folder):
        return ""
    for name, text in (("report.html", "report"), ("summary.json", "summary")):
        if (Path(run) / name).is_file():
            return f"<a href='{Path(run).relative_to(folder).as_posix()}/{name}'>{text}</a>"
    return ""

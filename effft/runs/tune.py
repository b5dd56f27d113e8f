"""`effft tune RECIPE`: a hyper-parameter search with Optuna, resumable and shared through its storage.

A trial is an `effft fit` of the recipe with the values Optuna's TPE sampler (seeded) draws from
the search space (config/space.py), into `<output_dir>/<name>/trials/<n>/`. It is judged on the
recipe's monitored validation metric (`monitor.metric`, as the best checkpoint chooses), and
pruned on that metric after each epoch (Optuna's median pruner, or successive halving, through
Optuna's Lightning callback); a trial whose figure is no longer a finite number has diverged and
is pruned at once. The test split is never evaluated in a trial: once the search ends, the best
trial alone is tested (`trials/<n>/tests/same_data/`).

The study lives in an Optuna RDB storage: by default an SQLite file, `<output_dir>/<name>/tune.db`.
SQLite serves several processes on one machine (each trial writes a few rows a minute, far
below what its file locking handles), needs no server, and keeps the study in the run
directory as one file that Optuna's own tools (optuna-dashboard, `optuna.load_study`) read;
Optuna's journal file is the other choice for one machine, but it is not a database that those
tools or SQL can query. For many machines, `--storage postgresql://...` or `mysql://...` is
Optuna's own RDB storage on a server all of them reach.

Resuming is giving the same command again: finished trials are kept. A trial whose process died
(kill -9, a crash, a lost machine) is marked failed and run again with the same values: at once
where its process is known to be gone (same machine), or when its heartbeat has been silent for
`STALE_AFTER` seconds (any machine).

Under the run directory, after the search: `best.yaml` (the best trial's recipe, named
`<name>-best`, which `effft fit` runs as it is), `trials.csv`, `importances.json` (Optuna's
fANOVA), `history.png` and `importances.png`, `tune.json` and `summary.md`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import socket
import sqlite3
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from ..config.load import search_space, validate, with_values
from ..config.schema import Recipe
from ..config.space import Param
from ..console import console
from ..data.splits import read_splits
from ..errors import EffftError, Interrupted, RecipeError
from ..paths import atomic_write, can_make_folder
from ..train.divergence import TrainingDiverged
from .build import monitor_direction
from .layout import CHECKPOINTS, made_by_fit
from .results import jsonable

log = logging.getLogger(__name__)

HEARTBEAT = 20  # seconds between a running trial's signs of life in the storage
STALE_AFTER = 120  # a running trial silent this long is taken for dead (another machine's too)
DEFAULT_TRIALS = 20
SPACE_ATTR, METRIC_ATTR = "effft:space", "effft:metric"
FINISHED = ("COMPLETE", "PRUNED")


def tune(recipe: Recipe, *, source: str, trials: int | None = None, budget: float | None = None,
         storage: str | None = None, pruner: str = "median", quiet: bool = False) -> Path:
    """Search, then test the best trial and write what the search found (see the module)."""
    try:
        import optuna
        import optuna_integration  # noqa: F401 - its Lightning pruning callback
    except ImportError as exc:
        raise EffftError(f"effft tune needs Optuna, which is not installed ({exc}): pip install 'effft[tune]'") from None

    space = search_space(recipe, source=source)
    _check_one_process(recipe)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # each trial is told of in effft's own lines
    metric = recipe.monitor.metric
    direction = monitor_direction(recipe)
    run_dir = recipe.run_dir
    if made_by_fit(run_dir):
        raise RecipeError(f"{run_dir} is the run directory of an effft fit, not of a search: give the search "
                          "another name (--set name=...)")
    if storage is None:
        can_make_folder(run_dir, what="the search's run directory (output_dir/name)")
        run_dir.mkdir(parents=True, exist_ok=True)
    url = storage or default_storage(run_dir)
    study = open_study(recipe, url, space=space, metric=metric, direction=direction, pruner=pruner)
    _fail_dead_trials(study)
    wanted = trials if trials is not None else (None if budget else DEFAULT_TRIALS)
    done = _count(study, FINISHED)
    if wanted is not None and done >= wanted:
        console.print(f"the study {recipe.name} in {url} has {done} finished trials already (--trials {wanted})",
                      markup=False, soft_wrap=True)
    else:
        callbacks: list[Any] = [_KeepBestCheckpoints(run_dir)]
        if wanted is not None:
            callbacks.append(optuna.study.MaxTrialsCallback(wanted, states=_states(FINISHED)))
        objective = _Objective(recipe, space, metric=metric)
        console.print(f"searching {len(space)} keys ({', '.join(p.path for p in space)}) for the best {metric} "
                      f"({direction}); study {recipe.name} in {url}"
                      + (f", {done} trials finished before" if done else ""), markup=False, soft_wrap=True)
        study.optimize(objective, n_trials=None, timeout=budget, callbacks=callbacks, gc_after_trial=True)
    return finish(study, recipe, metric=metric, quiet=quiet)


# ---------------------------------------------------------------------------- the storage


def default_storage(run_dir: Path) -> str:
    return f"sqlite:///{(run_dir / 'tune.db').resolve()}"


def _check_sqlite_file(url: str, path: str | None) -> None:
    """An existing SQLite file (`path`, behind `url`) must be an Optuna database: Optuna would
    otherwise add its tables to whatever the file is."""
    if not path or path == ":memory:" or not Path(path).exists() or Path(path).stat().st_size == 0:
        return
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:
        raise RecipeError(f"--storage {url}: {path} is not an SQLite database ({exc}); give a new file, or the "
                          "tune.db of an earlier search") from None
    if not {"studies", "trials", "version_info"} <= tables:
        raise RecipeError(f"--storage {url}: {path} is an SQLite database, but not one Optuna made (no studies "
                          "table); it is left as it is: give a new file, or the tune.db of an earlier search")


def _storage(url: str) -> Any:
    """Optuna's RDB storage at `url`, with heartbeats and the retry of dead trials; a bad URL or
    an unreachable server ends in one RecipeError naming it."""
    import optuna
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise RecipeError(f"--storage {url!r} is not a database URL ({exc}): give sqlite:///path/tune.db, "
                          "postgresql://user:password@host/db or mysql://...") from None
    engine: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        _check_sqlite_file(url, parsed.database)
        folder = Path(parsed.database or ".").parent
        if parsed.database and not folder.is_dir():
            raise RecipeError(f"--storage {url}: the folder {folder} does not exist")
        engine = {"connect_args": {"timeout": 60}}  # wait for another process's write, rather than fail
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT, grace_period=STALE_AFTER,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))
    except ImportError as exc:
        raise RecipeError(f"--storage {url}: the database driver is not installed ({exc}); for PostgreSQL: "
                          "pip install psycopg2-binary, for MySQL: pip install pymysql") from None
    except (SQLAlchemyError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RecipeError(f"--storage {url}: cannot open the study storage: {first}") from None


def _pruner(name: str, epochs: Any) -> Any:
    """The pruner; `epochs`, the recipe's trainer.max_epochs, sets how long a trial runs before it
    may be pruned: a third of its epochs. Early epochs say little of the end (warm-up, a frozen
    backbone, EMA weights that have not caught up, a small val split), and a median pruner that
    judges them stops good trials: on BreastMNIST, pruning from the second epoch on stopped
    every trial after the first three."""
    import optuna

    warmup = max(1, epochs // 3) if isinstance(epochs, int) and epochs > 0 else 1
    if name == "median":  # against the median of finished trials at the same epoch, after two of them
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=warmup)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=warmup)
    return optuna.pruners.NopPruner()


def _summaries(store: Any, name: str, *, wait: float = 10.0) -> dict[str, Any]:
    """The studies in `store` by name. Where study `name` is there without its search space and
    metric, another process is making it (it sets them just after): wait for them, up to `wait`
    seconds (a study made by something other than effft tune never gets them)."""
    import optuna

    deadline = time.monotonic() + wait
    while True:
        names = {s.study_name: s for s in optuna.study.get_all_study_summaries(store, include_best_trial=False)}
        attrs = names[name].user_attrs if name in names else None
        if attrs is None or {SPACE_ATTR, METRIC_ATTR} <= set(attrs) or time.monotonic() > deadline:
            return names
        time.sleep(0.1)


def open_study(recipe: Recipe, url: str, *, space: list[Param], metric: str, direction: str,
               pruner: str = "median") -> Any:
    """The study named after the recipe in `url`: made there if new; an existing one must have
    been made with the same search space and metric (nothing is changed in it otherwise)."""
    import optuna

    store = _storage(url)
    wanted = {p.path: p.to_dict() for p in space}
    names = _summaries(store, recipe.name)
    if recipe.name in names:
        attrs = names[recipe.name].user_attrs
        if attrs.get(SPACE_ATTR) != wanted or attrs.get(METRIC_ATTR) != metric:
            raise RecipeError(
                f"--storage {url}: its study {recipe.name!r} was made by another recipe (search space "
                f"{json.dumps(attrs.get(SPACE_ATTR))}, metric {attrs.get(METRIC_ATTR)}), not this one "
                f"({json.dumps(wanted)}, {metric}); it is left as it is: give this search another name "
                "(--set name=...) or another --storage")
    # Seeded by the recipe's seed, the trials the study has and this process: each start, and each
    # of several processes sharing the study, draws its own values (the same seed would make
    # processes started together try the same first values). What a trial drew is in the study.
    before = names[recipe.name].n_trials if recipe.name in names else 0
    seed = (recipe.seed * 1_000_003 + before * 7919 + os.getpid()) % 2**32
    sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    study = optuna.create_study(storage=store, study_name=recipe.name, direction="minimize" if direction == "min"
                                else "maximize", sampler=sampler, pruner=_pruner(pruner, recipe.trainer.get("max_epochs")),
                                load_if_exists=True)
    if recipe.name not in names:
        study.set_user_attr(SPACE_ATTR, wanted)
        study.set_user_attr(METRIC_ATTR, metric)
    return study


def _states(names: tuple[str, ...]) -> tuple[Any, ...]:
    from optuna.trial import TrialState

    return tuple(TrialState[n] for n in names)


def _count(study: Any, names: tuple[str, ...]) -> int:
    return len(study.get_trials(deepcopy=False, states=_states(names)))


def _fail_dead_trials(study: Any) -> None:
    """Running trials of this machine whose process is gone (kill -9, a crash): failed now, and
    run again with the same values, without waiting for their heartbeat to go stale."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.user_attrs.get("host") != host or _alive(trial.user_attrs.get("pid")):
            continue
        try:
            failed = study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except UpdateFinishedTrialError:  # another process got there first
            continue
        if failed:
            console.print(f"trial {trial.number}: its process ({trial.user_attrs.get('pid')}) is gone; marked "
                          "failed, and run again with the same values", markup=False)
            retry = study._storage.get_heartbeat_stale_trial_callback()
            retry(study, study._storage.get_trial(trial._trial_id))


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return True  # not ours to judge: its heartbeat will tell
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------- a trial


def trial_dir(run_dir: Path, number: int) -> Path:
    return run_dir / "trials" / str(number)


def _pruning_callback(trial: Any, metric: str) -> Any:
    """Optuna's Lightning callback, which also prunes a diverged trial (its figure not finite) at
    once: no pruner needs the finished trials to see that it cannot win."""
    import optuna
    from lightning.pytorch.trainer.states import TrainerFn
    from optuna_integration import PyTorchLightningPruningCallback

    class Pruning(PyTorchLightningPruningCallback):
        epochs = 0  # validated so far

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
                return  # not the checks before training, nor the evaluation of the best checkpoint after it
            self.epochs = pl_module.current_epoch + 1
            value = trainer.callback_metrics.get(metric)
            if value is not None and not math.isfinite(float(value)):
                raise optuna.TrialPruned(f"{metric} is {float(value)} after epoch {pl_module.current_epoch + 1}: "
                                         "the trial diverged")
            super().on_validation_end(trainer, pl_module)

    return Pruning(trial, monitor=metric)


def _check_one_process(recipe: Recipe) -> None:
    """A trial is one process: under DDP each copy of the command would draw trials of its own."""
    import tempfile

    from .build import check_one_process, make_trainer

    with tempfile.TemporaryDirectory(prefix="effft-tune-") as scratch, _trial_logs():
        trainer = make_trainer(recipe, Path(scratch), task="", classes=[], quiet=True, fit=False)
    check_one_process(trainer, "effft tune: each trial",
                      "set trainer.devices: 1. To search on several GPUs, start one effft tune per GPU "
                      "(CUDA_VISIBLE_DEVICES=0, 1, ...) with the same --storage, then refit best.yaml with the "
                      "devices you want")


class _Objective:
    """One trial: the recipe with the trial's values, fitted (val only), scored on val."""

    def __init__(self, recipe: Recipe, space: list[Param], *, metric: str) -> None:
        self.base = recipe.to_dict()
        self.base.pop("tune", None)
        self.run_dir, self.space, self.metric = recipe.run_dir, space, metric

    def __call__(self, trial: Any) -> float:
        import optuna

        from .fit import fit

        values = {p.path: p.suggest(trial) for p in self.space}
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        out = trial_dir(self.run_dir, trial.number)
        raw = with_values(self.base, values)
        raw.update(name=str(trial.number), output_dir=str(out.parent))
        recipe = validate(raw, source=f"trial {trial.number}")
        planned = recipe.trainer.get("max_epochs")
        trial.set_user_attr("epochs_planned", planned if isinstance(planned, int) and planned > 0 else None)
        shown = ", ".join(f"{k}={_short(v)}" for k, v in values.items())
        console.print(f"trial {trial.number}: {shown}", markup=False, soft_wrap=True)
        pruning = _pruning_callback(trial, self.metric)
        started = time.perf_counter()
        try:
            with warnings.catch_warnings(), _trial_logs():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                # a diverged trial's NaN outputs: it is pruned for them, and says so
                warnings.filterwarnings("ignore", message="Encountered `nan` values")
                fit(recipe, overwrite=True, quiet=True, trial=[pruning], command=f"effft tune (trial {trial.number})")
        except Interrupted as exc:  # Ctrl-C or SIGTERM: the trial is failed, the study kept
            what = str(exc).split(":", 1)[0]
            raise Interrupted(f"{what} in trial {trial.number}: the study keeps its finished trials; give the same "
                              "effft tune command again to go on", exit_code=exc.exit_code) from None
        except TrainingDiverged as exc:  # a trial's own failure, not the study's: pruned, and says so
            exc = optuna.TrialPruned(f"the trial diverged ({str(exc).split('. ', 1)[0]})")
            trial.set_user_attr("epochs_run", pruning.epochs + 1)  # those validated and the one it diverged in
            console.print(f"trial {trial.number}: pruned in epoch {pruning.epochs + 1} "
                          f"({time.perf_counter() - started:.0f} s): {exc}", markup=False, soft_wrap=True)
            raise exc from None
        except optuna.TrialPruned as exc:
            trial.set_user_attr("epochs_run", pruning.epochs)
            why = f": {exc}" if "diverged" in str(exc) else ""
            console.print(f"trial {trial.number}: pruned after epoch {pruning.epochs} "
                          f"({time.perf_counter() - started:.0f} s){why}", markup=False, soft_wrap=True)
            raise
        trial.set_user_attr("epochs_run", pruning.epochs)
        val = json.loads((out / "metrics.json").read_text()).get("val", {})
        value = val.get(self.metric.removeprefix("val/"))
        if value is None or not math.isfinite(value):
            raise optuna.TrialPruned(f"{self.metric} of its best checkpoint is {value}: the trial diverged")
        console.print(f"trial {trial.number}: {self.metric} {value:.4f} ({time.perf_counter() - started:.0f} s)",
                      markup=False)
        return float(value)


@contextmanager
def _trial_logs() -> Iterator[None]:
    """A trial's fit says what it found in one line of its own: the messages of its data loading and
    its Trainer are kept to warnings while it runs."""
    root = logging.getLogger()
    names = ("lightning", "lightning.pytorch", "lightning.fabric")
    before = root.level, [logging.getLogger(n).level for n in names]
    root.setLevel(max(root.level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(before[0])
        for name, level in zip(names, before[1]):
            logging.getLogger(name).setLevel(level)


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


class _KeepBestCheckpoints:
    """After each trial: the checkpoints of finished trials other than the best are deleted (the
    metrics and logs stay). Only finished trials are touched, so processes sharing the study
    never delete a running trial's files."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def __call__(self, study: Any, _trial: Any) -> None:
        import shutil

        best = _best_number(study)
        for t in study.get_trials(deepcopy=False, states=_states(("COMPLETE", "PRUNED", "FAIL"))):
            if t.number != best:
                shutil.rmtree(trial_dir(self.run_dir, t.number) / CHECKPOINTS, ignore_errors=True)


def _best_number(study: Any) -> int | None:
    try:
        return study.best_trial.number
    except ValueError:  # no trial completed yet
        return None


# ---------------------------------------------------------------------------- the result


def finish(study: Any, recipe: Recipe, *, metric: str, quiet: bool) -> Path:
    """Test the best trial (once), write best.yaml, the trials table, importances, plots,
    tune.json and summary.md."""
    from .test import test

    run_dir = recipe.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    best_n = _best_number(study)
    rows = _trial_rows(study)
    _write_rows(run_dir / "trials.csv", rows)
    if best_n is None:
        raise EffftError(f"no trial of the study {recipe.name} completed ({len(rows)} ran: see {run_dir / 'trials.csv'}); "
                         "nothing to choose from")
    best = study.best_trial
    best_dir = trial_dir(run_dir, best_n)
    tested = best_dir / "tests" / "same_data" / "metrics.json"
    test_figures: dict[str, Any] = {}
    has_test = "test" in read_splits(best_dir / "splits.csv").values()
    if has_test and not tested.exists() and (best_dir / CHECKPOINTS / "best.ckpt").exists():
        console.print(f"the best trial is {best_n} ({metric} {best.value:.4f} on val); its test split, evaluated "
                      "once:", markup=False)
        test(best_dir, quiet=quiet)
    if tested.exists():
        test_figures = json.loads(tested.read_text())
    best_recipe = yaml.safe_load((best_dir / "recipe.yaml").read_text())
    best_recipe.update(name=f"{recipe.name}-best", output_dir=str(recipe.output_dir))
    best_recipe.pop("tune", None)
    with atomic_write(run_dir / "best.yaml") as tmp:
        tmp.write_text(f"# the best trial ({best_n}) of `effft tune` {recipe.name}: {metric} {best.value:.6g} on val\n"
                       + yaml.safe_dump(best_recipe, sort_keys=False))
    importances = _importances(study, run_dir, metric=metric, seed=recipe.seed)
    _history_plot(study, run_dir, metric=metric)
    summary = _facts(study, rows, best_n=best_n, metric=metric, importances=importances, test_figures=test_figures)
    with atomic_write(run_dir / "tune.json") as tmp:
        tmp.write_text(json.dumps(jsonable(summary), indent=2))
    _write_summary(run_dir, recipe.name, summary)
    console.print(f"best trial {best_n}: {metric} {best.value:.4f}; its recipe: {run_dir / 'best.yaml'} "
                  f"(refit with: effft fit {run_dir / 'best.yaml'}); summary: {run_dir / 'summary.md'}",
                  markup=False, soft_wrap=True)
    return run_dir


def _trial_rows(study: Any) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else None
        rows.append({"number": t.number, "state": t.state.name, "value": t.value, "seconds": seconds,
                     "epochs_run": t.user_attrs.get("epochs_run"), "epochs_planned": t.user_attrs.get("epochs_planned"),
                     "retry_of": t.system_attrs.get("failed_trial"), **{f"param:{k}": v for k, v in t.params.items()}})
    return rows


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with atomic_write(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns or ["number"])
        writer.writeheader()
        writer.writerows(rows)


def _importances(study: Any, run_dir: Path, *, metric: str, seed: int) -> dict[str, float]:
    """fANOVA importances of the searched keys (Optuna's), with their plot; empty with fewer than
    two completed trials or no key that varied."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator

    if _count(study, ("COMPLETE",)) < 2:
        return {}
    try:
        importances = optuna.importance.get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=seed))
    except (RuntimeError, ValueError) as exc:  # e.g. every completed trial drew the same values
        log.debug("no parameter importances: %s", exc)
        return {}
    with atomic_write(run_dir / "importances.json") as tmp:
        tmp.write_text(json.dumps(importances, indent=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = optuna.visualization.matplotlib.plot_param_importances(
            study, evaluator=FanovaImportanceEvaluator(seed=seed), target_name=metric)
    _save(ax, run_dir / "importances.png")
    return dict(importances)


def _history_plot(study: Any, run_dir: Path, *, metric: str) -> None:
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = optuna.visualization.matplotlib.plot_optimization_history(study, target_name=metric)
    _save(ax, run_dir / "history.png")


def _save(ax: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = ax.figure
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _facts(study: Any, rows: list[dict[str, Any]], *, best_n: int, metric: str, importances: dict[str, float],
           test_figures: dict[str, Any]) -> dict[str, Any]:
    """What tune.json holds: the counts, the time, what pruning saved, the best trial."""
    by_state: dict[str, int] = {}
    for row in rows:
        by_state[row["state"]] = by_state.get(row["state"], 0) + 1
    pruned = [r for r in rows if r["state"] == "PRUNED" and r["seconds"] and r["epochs_run"] and r["epochs_planned"]]
    # a pruned trial would have run its remaining epochs at the pace of those it ran
    saved = sum(r["seconds"] * (r["epochs_planned"] / r["epochs_run"] - 1) for r in pruned)
    best = study.best_trial
    return {"study": study.study_name, "metric": metric, "direction": study.direction.name.lower(),
            "trials": by_state, "seconds": sum(r["seconds"] or 0 for r in rows),
            "pruning": {"pruned": by_state.get("PRUNED", 0), "seconds_spent": sum(r["seconds"] for r in pruned),
                        "seconds_saved": saved},
            "best": {"trial": best_n, "params": best.params, "val": best.value, "test": test_figures.get("test", {}),
                     "test_intervals": test_figures.get("intervals", {}).get("test", {})},
            "importances": importances}


def _write_summary(run_dir: Path, name: str, facts: dict[str, Any]) -> None:
    best = facts["best"]
    lines = [f"# Search {name}", "",
             f"Trials: {', '.join(f'{n} {s.lower()}' for s, n in facts['trials'].items())}; "
             f"{facts['seconds'] / 60:.1f} minutes of trials.",
             f"Pruning: {facts['pruning']['pruned']} trials pruned after {facts['pruning']['seconds_spent']:.0f} s; "
             f"run to their end they would have taken about {facts['pruning']['seconds_saved']:.0f} s more.", "",
             f"## Best trial: {best['trial']}", "",
             f"Chosen on val: {facts['metric']} = {best['val']:.4f}. Recipe: [best.yaml](best.yaml); run: "
             f"[trials/{best['trial']}/](trials/{best['trial']}/).", "", "| key | value |", "| --- | --- |"]
    lines += [f"| {k} | {_short(v)} |" for k, v in best["params"].items()]
    if best["test"]:
        lines += ["", "Test split, evaluated once for this trial only:", "", "| metric | value | 95% interval |",
                  "| --- | --- | --- |"]
        for k, v in best["test"].items():
            if "/" in k or not isinstance(v, (int, float)):
                continue
            ci = best["test_intervals"].get(k) or {}
            span = f"{ci['low']:.3f}-{ci['high']:.3f}" if ci.get("low") is not None and ci.get("high") is not None else ""
            lines.append(f"| {k} | {v:.4f} | {span} |")
    else:
        lines += ["", "The data have no test split: no test figure."]
    lines += ["", "## The search", "", "- every trial: [trials.csv](trials.csv)", "- history: ![history](history.png)"]
    if facts["importances"]:
        lines += ["- importances (fANOVA): ![importances](importances.png)", "",
                  "| key | importance |", "| --- | --- |"]
        lines += [f"| {k} | {v:.3f} |" for k, v in facts["importances"].items()]
    with atomic_write(run_dir / "summary.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")

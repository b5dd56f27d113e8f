"""What the evaluation of an embedding run (`task: embedding`) writes, and its baselines.

The test split's embeddings (gathered by `train/embedding.py`) are judged with the thresholds
chosen on val (`evaluate/verification.py`), with intervals. Beside them, on the same val and
test people, the baselines: the pretrained weights' pooled features (what the run started
from, with no face training) and every run of `report.baselines` (e.g. the same recipe with a
softmax head: a classifier's penultimate features). Each baseline's thresholds come from its
own val embeddings, as the run's do. Written: metrics.json (`test`, `intervals`, `counts`,
`thresholds`, `baselines`), report/roc.png (all approaches), report/scores.png (genuine and
impostor similarities), report/pairs.csv and summary.md.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config.schema import Recipe
from ..data.dataset import LoadedData
from ..errors import EffftError, RecipeError, WeightsError
from ..evaluate.verification import Evaluation, choose_thresholds, evaluate
from ..input import InputSpec
from ..paths import atomic_write
from .build import Built, recipe_weights
from .layout import CHECKPOINTS, input_spec, load_checkpoint_meta
from .results import jsonable, write_results, write_rows

log = logging.getLogger(__name__)

PRETRAINED = "pretrained features"
BATCH = 32


@dataclass
class Judged:
    """One approach judged on the run's people: its val thresholds and its test evaluation."""

    name: str
    weights: str
    thresholds: dict[str, float]
    evaluation: Evaluation


# ----------------------------------------------------------------------------- embedding images


@torch.no_grad()
def embed_items(model: torch.nn.Module, items: list[Any], *, data: LoadedData, spec: InputSpec, head: str,
                flip: bool) -> np.ndarray:
    """The normalised embeddings (N, D) of `items`, read as the run's adapter reads them (face
    crops) and prepared with `spec`'s eval pipeline."""
    from ..data.transforms import apply, build_pipeline
    from ..train.embedding import embed

    pipeline = build_pipeline(train=False, entries=data.cfg.augment.eval, spec=spec)
    model.eval()
    out = []
    for start in range(0, len(items), BATCH):
        batch = torch.stack([apply(pipeline, data.source.read(it, spec.channels), spec.channels)
                             for it in items[start:start + BATCH]])
        out.append(embed(model, batch, head=head, flip=flip).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


def _judge(name: str, weights: str, model: torch.nn.Module, *, head: str, spec: InputSpec, built: Built) -> Judged:
    data, recipe = built.data, built.recipe
    flip = recipe.metrics.tta == "flip"
    people = {s: np.array([it.target for it in data.split_items(s)]) for s in ("val", "test")}
    found = {s: embed_items(model, data.split_items(s), data=data, spec=spec, head=head, flip=flip)
             for s in ("val", "test")}
    thresholds = choose_thresholds(found["val"], people["val"], seed=recipe.seed) if len(people["val"]) else {}
    return Judged(name=name, weights=weights, thresholds=thresholds,
                  evaluation=evaluate(found["test"], people["test"], thresholds=thresholds, seed=recipe.seed))


# ----------------------------------------------------------------------------- baselines


@dataclass(frozen=True)
class BaselineRun:
    """A run of `report.baselines`: its checkpoint, what it is, and the people it trained on."""

    path: Path
    ckpt: Path
    meta: dict[str, Any]
    head: str  # how its embedding is read: softmax (pooled features) or its margin head
    trained_on: list[str]


def baseline_runs(recipe: Recipe, data: LoadedData) -> list[BaselineRun]:
    """The runs of `report.baselines`, checked: readable, and trained on none of the people of
    this run's val and test splits (else they would be judged on people they have seen)."""
    runs = []
    judged = {data.classes[int(it.target)] for s in ("val", "test") for it in data.split_items(s)}  # type: ignore[arg-type]
    for path in recipe.report.baselines:
        try:
            ckpt, meta = load_checkpoint_meta(Path(path))
        except EffftError as exc:
            raise RecipeError(f"report.baselines: {exc}") from None
        classes = [str(c) for c in meta.get("classes", [])]
        embedding = meta.get("embedding") or {}
        if meta.get("task") == "embedding":
            head = str(embedding.get("head", "arcface"))
            trained_on = [classes[int(i)] for i in embedding.get("train_people", [])]
        else:  # a classifier: its penultimate (pooled) features; it trained on every class it names
            head, trained_on = "softmax", classes
        seen = sorted(judged & set(trained_on))
        if seen:
            raise RecipeError(f"report.baselines: {path} trained on {len(seen)} of the people this run is judged on "
                              f"(e.g. {', '.join(seen[:3])}): its figures would flatter it; give a run trained on "
                              "this run's training people only, e.g. this recipe with model.head.type: softmax")
        runs.append(BaselineRun(path=Path(path), ckpt=ckpt, meta=meta, head=head, trained_on=trained_on))
    return runs


def _load_baseline(run: BaselineRun) -> torch.nn.Module:
    from ..model.registry import create_model

    meta = run.meta
    embedding = meta.get("embedding") or {}
    if meta.get("task") == "embedding":
        softmax = run.head == "softmax"
        return create_model(str(meta["model_name"]), in_chans=int(meta["in_chans"]), pretrained=run.ckpt,
                            num_classes=len(run.trained_on) if softmax else 0,
                            embedding_dim=None if softmax else int(embedding["dim"]))
    return create_model(str(meta["model_name"]), in_chans=int(meta["in_chans"]), pretrained=run.ckpt,
                        num_classes=len(meta["classes"]))


def baselines(built: Built) -> list[Judged]:
    """The pretrained weights' pooled features and the runs of `report.baselines`, judged on
    this run's people."""
    from ..model.registry import create_model

    recipe, out = built.recipe, []
    weights = recipe_weights(recipe)
    if weights is not None:
        try:
            model = create_model(recipe.model.arch, pretrained=weights, num_classes=0, in_chans=recipe.model.in_chans)
            out.append(_judge(PRETRAINED, str(model.weights_source or weights), model, head="softmax",
                              spec=built.spec, built=built))
        except WeightsError as exc:
            log.warning("no pretrained baseline: %s", exc)
    for run in baseline_runs(recipe, built.data):
        out.append(_judge(str(run.path), str(run.ckpt), _load_baseline(run), head=run.head,
                          spec=input_spec(run.meta, run.ckpt), built=built))
    return out


# ----------------------------------------------------------------------------- writing


def _rows(judged: list[Judged]) -> list[str]:
    if not judged:
        return []
    names = list(dict.fromkeys(n for j in judged for n in j.evaluation.figures))
    lines = ["## Baselines on the same people", "",
             "Each approach's thresholds were chosen on its own val embeddings; 95% intervals (bootstrap over "
             "people) in brackets.", "", "| figure | " + " | ".join(j.name for j in judged) + " |",
             "|---" * (len(judged) + 1) + "|"]
    from ..report.summary import _fmt

    for name in names:
        cells = [_fmt(j.evaluation.figures.get(name), j.evaluation.intervals.get(name)) for j in judged]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return ["\n".join(lines)]


def write_embedding_results(out: Path, built: Built, results: dict[str, dict[str, float]], *,
                            run_files: Path | None = None) -> dict[str, Any]:
    """metrics.json, report/ and summary.md of an embedding run's evaluation in `out` (see the
    module docstring); returns what metrics.json holds."""
    from ..report.figures import plot_pair_roc, plot_scores
    from ..report.html import write_html_report
    from ..report.summary import write_summary

    module, recipe = built.module, built.recipe
    test = module.predictions.get("test")
    thresholds = {k: float(v) for k, v in module.operating.items()}
    written: dict[str, Any] = dict(results)
    judged: list[Judged] = []
    own = None
    if test is not None and len(test["targets"]):
        own = evaluate(test["embeddings"].numpy(), test["targets"].numpy(), thresholds=thresholds, seed=recipe.seed)
        written["test"] = {**results.get("test", {}), **own.figures}
        written["intervals"] = {"test": own.intervals}
        written["counts"] = {"test": own.counts}
        judged = baselines(built)
        written["baselines"] = {j.name: {"weights": j.weights, "test": j.evaluation.figures,
                                         "intervals": j.evaluation.intervals, "thresholds": j.thresholds}
                                for j in judged}
    written["thresholds"] = {**thresholds, "chosen_on": "val"}
    written = jsonable(written)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(written, indent=2))
    report = out / "report"
    if own is not None:
        pairs = own.pairs
        curves = {recipe.name: (pairs.score, pairs.same)}
        curves.update({j.name: (j.evaluation.pairs.score, j.evaluation.pairs.same) for j in judged})
        plot_pair_roc(report / "roc.png", curves, title=f"{recipe.name} (test people)")
        plot_scores(report / "scores.png", pairs.genuine, pairs.impostor, threshold=thresholds.get("verification"),
                    title=f"{recipe.name} (test people)")
        paths = [it.path for it in built.data.split_items("test")]
        order = test["index"].tolist()
        write_rows(report / "pairs.csv", [{"a": paths[order[a]], "b": paths[order[b]], "same_person": int(s),
                                           "similarity": f"{v:.6f}"}
                                          for a, b, s, v in zip(pairs.a, pairs.b, pairs.same, pairs.score)])
    shown = {s: written[s] for s in ("val", "test") if s in written}
    write_summary(out, recipe_name=recipe.name, model_name=recipe.model.arch, weights=built.weights,
                  metrics_by_split=shown, intervals={"test": own.intervals} if own is not None else None,
                  card=recipe.card, notes=built.data.notes + [
                      "Embedding run: similarities are cosines of L2-normalised embeddings; the thresholds "
                      f"(verification {thresholds.get('verification', float('nan')):.4g}) were chosen on val "
                      "and applied unchanged to test."],
                  sections=_rows(judged),
                  files={"report, one page": "report.html", "checkpoints": CHECKPOINTS, "figures and tables": "report",
                         "logs": "logs"})
    write_html_report(out, run_files=run_files or out)
    return written


def write_evaluation(out: Path, built: Built, results: dict[str, dict[str, float]], *,
                     run_files: Path | None = None) -> dict[str, Any]:
    """What an evaluation writes in `out`: an embedding run's (above) or a classifier's
    (`results.write_results`)."""
    if built.recipe.task == "embedding":
        return write_embedding_results(out, built, results, run_files=run_files)
    return write_results(out, built, results, run_files=run_files)


def shown_results(built: Built, results: dict[str, dict[str, float]],
                  written: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The figures printed at the end: an embedding run's test figures are those written."""
    if built.recipe.task != "embedding" or "test" not in written:
        return results
    return {**results, "test": {k: float("nan") if v is None else v for k, v in written["test"].items()}}

"""Face (identity) embeddings judged on people never seen in training.

Embeddings are L2-normalised, so the similarity of two photos is their cosine (a dot product).

- Verification ("are these two photos one person?"): every genuine pair (two photos of one
  person) and the impostor pairs (two people), all of them or a seeded sample of MAX_IMPOSTORS.
  ROC and AUROC, the equal error rate (EER: where the false accept and false reject rates
  meet, interpolated between ROC points), the true accept rate at a false accept rate
  (TAR@FAR, the best TAR among thresholds whose FAR is at most that; given where the impostor
  pairs allow at least MIN_FALSE_ACCEPTS false accepts) and the accuracy at the threshold
  chosen on val, genuine and impostor pairs weighing half each (the LFW-style figure: LFW has
  as many of both).
- Closed-set identification: k photos of each person are enrolled (their mean embedding is the
  person's template), the other photos search the gallery; rank-1 and rank-5 are the shares of
  searches whose person is first, or among the first five. People with k or fewer photos are
  left out for that k. Averaged over seeded choices of the enrolled photos ("draws"): as many
  as give at least MIN_SEARCHES searches, from MIN_DRAWS to MAX_DRAWS. Which photo is enrolled
  moves rank-1 much on a small test split (20 people, one photo enrolled: 0.85 to 0.88 between
  seeds with 5 draws); more draws average that chance away.
- Open-set identification: in each draw half the people are left out of the gallery. A search
  by an enrolled person is detected and identified when its person comes first with a
  similarity at or above the threshold; a search by someone left out is a false alarm when
  anyone scores at or above it. DIR is the detection-and-identification rate at the threshold
  that gives a false-alarm rate of 1e-2 on val.

Intervals: a bootstrap over people (a resample draws people with replacement; each brings its
photos, its pairs and its searches), as photos and pairs of one person are not independent. A
pair of two people drawn c_a and c_b times weighs c_a * c_b, a genuine pair of a person drawn
c times weighs c (the "subsets bootstrap" of Bolle et al., 2004).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from .intervals import RESAMPLES, WEIGHT, around, bootstrap, ranked, ranking, ratio

FARS = (1e-2, 1e-3)
MIN_FALSE_ACCEPTS = 10  # a TAR at FAR f is given where f x impostor pairs reaches this
MAX_IMPOSTORS = 200_000
ENROLLED = (1, 5)  # photos enrolled per person in identification
MIN_DRAWS, MAX_DRAWS = 5, 100  # seeded choices of the enrolled photos (and people left out), averaged
MIN_SEARCHES = 10_000  # draws are added until the searches of all of them reach this
OPEN_SET_FAR = 1e-2
RANKS = (1, 5)


def far_name(far: float) -> str:
    """1e-2 -> "1e-2", as the figures are named (tar_at_far_1e-2)."""
    return f"1e-{round(-math.log10(far))}"


# ----------------------------------------------------------------------------- pairs


@dataclass(frozen=True)
class Pairs:
    """Photo pairs of a split: indices `a`, `b`, whether they are one person, their cosine."""

    a: np.ndarray
    b: np.ndarray
    same: np.ndarray
    score: np.ndarray

    @property
    def genuine(self) -> np.ndarray:
        return self.score[self.same]

    @property
    def impostor(self) -> np.ndarray:
        return self.score[~self.same]


def make_pairs(embeddings: np.ndarray, people: np.ndarray, *, seed: int = 0,
               max_impostors: int = MAX_IMPOSTORS) -> Pairs:
    """Every genuine pair, and every impostor pair or a seeded sample of `max_impostors`."""
    e, y = np.asarray(embeddings, np.float32), np.asarray(people)
    a, b = np.triu_indices(len(y), k=1)
    same = y[a] == y[b]
    impostors = np.flatnonzero(~same)
    if len(impostors) > max_impostors:
        keep = np.random.default_rng(seed).choice(impostors, max_impostors, replace=False)
        chosen = np.sort(np.r_[np.flatnonzero(same), keep])
        a, b, same = a[chosen], b[chosen], same[chosen]
    score = np.einsum("nd,nd->n", e[a], e[b]).astype(np.float64)
    return Pairs(a=a, b=b, same=same, score=score)


# ----------------------------------------------------------------------------- ROC figures


def eer_of(fpr: np.ndarray, tpr: np.ndarray) -> np.ndarray:
    """The equal error rate of ROC curves (rows of `fpr`, `tpr`, from the highest threshold
    down): where FAR = FRR, linearly between the two ROC points around the crossing."""
    fpr, tpr = np.atleast_2d(fpr), np.atleast_2d(tpr)
    gap = (1 - tpr) - fpr  # falls from 1 towards -1 as the threshold falls
    after = np.argmax(gap <= 0, axis=1)  # the first point at or past the crossing
    rows = np.arange(len(fpr))
    before = np.maximum(after - 1, 0)
    g0, g1 = gap[rows, before], gap[rows, after]
    t = np.where(g0 > g1, g0 / np.where(g0 > g1, g0 - g1, 1), 0.0)
    return fpr[rows, before] + t * (fpr[rows, after] - fpr[rows, before])


def tar_at(fpr: np.ndarray, tpr: np.ndarray, far: float) -> np.ndarray:
    """The best TAR among the ROC points whose FAR is at most `far` (rows of curves)."""
    fpr, tpr = np.atleast_2d(fpr), np.atleast_2d(tpr)
    return np.where(fpr <= far, tpr, 0.0).max(axis=1)


def roc_figures(score: np.ndarray, same: np.ndarray, *, threshold: float | None = None) -> dict[str, float]:
    """AUROC, EER, TAR@FAR (where the pairs allow) and, at `threshold`, the accuracy, from
    scikit-learn's ROC of the pair scores."""
    same = np.asarray(same, bool)
    if same.all() or not same.any():
        return {}
    fpr, tpr, _ = roc_curve(same, score, drop_intermediate=False)
    out = {"auroc": float(roc_auc_score(same, score)), "eer": float(eer_of(fpr, tpr)[0])}
    impostors = int((~same).sum())
    for far in FARS:
        if far * impostors >= MIN_FALSE_ACCEPTS:
            out[f"tar_at_far_{far_name(far)}"] = float(tar_at(fpr, tpr, far)[0])
    if threshold is not None:
        out["accuracy"] = pair_accuracy(score, same, threshold)
    return out


def pair_accuracy(score: np.ndarray, same: np.ndarray, threshold: float) -> float:
    """The accuracy on pairs at `threshold` (same person at score >= threshold), genuine and
    impostor pairs weighing half each: LFW's protocol has as many of both, so this is the
    LFW-style accuracy whatever the two counts are here."""
    same, accepted = np.asarray(same, bool), np.asarray(score) >= threshold
    return float((accepted[same].mean() + (~accepted[~same]).mean()) / 2)


def accuracy_threshold(score: np.ndarray, same: np.ndarray) -> float:
    """The similarity threshold with the best `pair_accuracy`, half-way between the two scores
    around it."""
    order = np.argsort(-score, kind="stable")
    s, pos = score[order], np.asarray(same, bool)[order]
    # accepting the first i pairs: the share of genuine pairs among them, of impostors after
    accepted = np.r_[0, np.cumsum(pos)] / max(1, pos.sum())
    rejected = 1 - np.r_[0, np.cumsum(~pos)] / max(1, (~pos).sum())
    cuts = np.r_[0, np.flatnonzero(s[1:] != s[:-1]) + 1, len(s)]  # only between distinct scores
    best = int(cuts[np.argmax((accepted + rejected)[cuts])])
    if best == 0:
        return float(np.nextafter(s[0], np.inf))
    if best == len(s):
        return float(s[-1])
    return float((s[best - 1] + s[best]) / 2)


def far_threshold(impostor_scores: np.ndarray, far: float) -> float:
    """The lowest threshold at which at most `far` of the impostor scores are at or above it."""
    s = np.sort(np.asarray(impostor_scores, np.float64))[::-1]
    if not len(s):
        return math.nan
    allowed = int(math.floor(far * len(s)))  # false accepts allowed
    if allowed >= len(s):
        return float(s[-1])
    # strictly above the (allowed+1)-th highest impostor: no more than `allowed` accepted
    return float(np.nextafter(s[allowed], np.inf))


# ----------------------------------------------------------------------------- identification


@dataclass(frozen=True)
class Searches:
    """The gallery searches of one enrolment size k over all draws: each search's person, its
    top similarity, whether its person came first (rank-1) or in the top five, and whether its
    person was enrolled at all (open set)."""

    person: np.ndarray
    top: np.ndarray
    rank1: np.ndarray
    rank5: np.ndarray
    enrolled: np.ndarray
    gallery_size: int


def _templates(e: np.ndarray, rows: list[np.ndarray]) -> np.ndarray:
    means = np.stack([e[r].mean(0) for r in rows])
    return means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)


def searches(embeddings: np.ndarray, people: np.ndarray, *, k: int, open_set: bool, seed: int = 0,
             draws: int | None = None) -> Searches | None:
    """Gallery searches with k photos enrolled per person (see the module docstring); with
    `open_set`, half the people (at least one) are left out of each draw's gallery. `draws`: None
    for as many as the module docstring says. None where fewer than two people have more than
    k photos."""
    e, y = np.asarray(embeddings, np.float32), np.asarray(people)
    names, counts = np.unique(y, return_counts=True)
    usable = names[counts > k]
    if len(usable) < 2:
        return None
    if draws is None:
        per_draw = int(np.isin(y, usable).sum()) - k * len(usable)  # at most, open or closed set
        draws = int(np.clip(math.ceil(MIN_SEARCHES / max(per_draw, 1)), MIN_DRAWS, MAX_DRAWS))
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {key: [] for key in ("person", "top", "rank1", "rank5", "enrolled")}
    gallery_size = 0
    for _ in range(draws):
        out = set(rng.choice(usable, max(1, len(usable) // 2), replace=False).tolist()) if open_set else set()
        gallery = [p for p in usable if p not in out]
        enrolled_rows, probe_rows = [], []
        for p in gallery:
            rows = rng.permutation(np.flatnonzero(y == p))
            enrolled_rows.append(rows[:k])
            probe_rows.append(rows[k:])
        strangers = [np.flatnonzero(y == p) for p in sorted(out)]
        probes = np.concatenate(probe_rows + strangers)
        sims = e[probes] @ _templates(e, enrolled_rows).T  # (searches, gallery)
        order = np.argsort(-sims, axis=1, kind="stable")
        truth = np.array([gallery.index(p) if p in gallery else -1 for p in y[probes]])
        place = np.argmax(order == truth[:, None], axis=1)
        known = truth >= 0
        parts["person"].append(y[probes])
        parts["top"].append(sims[np.arange(len(probes)), order[:, 0]].astype(np.float64))
        parts["rank1"].append(known & (place == 0))
        parts["rank5"].append(known & (place < 5))
        parts["enrolled"].append(known)
        gallery_size = len(gallery)
    return Searches(**{key: np.concatenate(v) for key, v in parts.items()}, gallery_size=gallery_size)


def open_set_threshold(embeddings: np.ndarray, people: np.ndarray, *, k: int, seed: int = 0,
                       far: float = OPEN_SET_FAR) -> float:
    """The threshold that gives a false-alarm rate of at most `far` on these (val) people."""
    found = searches(embeddings, people, k=k, open_set=True, seed=seed)
    return math.nan if found is None else far_threshold(found.top[~found.enrolled], far)


# ----------------------------------------------------------------------------- thresholds and figures


def choose_thresholds(embeddings: np.ndarray, people: np.ndarray, *, seed: int = 0) -> dict[str, float]:
    """What the val split decides: the verification threshold (best pair accuracy) and the
    open-set thresholds (false-alarm rate 1e-2) for each enrolment size."""
    pairs = make_pairs(embeddings, people, seed=seed)
    out = {"verification": accuracy_threshold(pairs.score, pairs.same) if pairs.same.any() else math.nan}
    for k in ENROLLED:
        out[f"open_set_k{k}"] = open_set_threshold(embeddings, people, k=k, seed=seed)
    return out


def _identification_figures(found: Searches, *, k: int, threshold: float | None) -> dict[str, float]:
    """Rank-1 and rank-5 (closed set) of enrolment size k; DIR and the false-alarm rate (open set)
    at `threshold`."""
    out: dict[str, float] = {}
    if found.enrolled.any() and not (~found.enrolled).any():  # closed set
        out[f"rank1_k{k}"] = float(found.rank1.mean())
        if found.gallery_size > 5:
            out[f"rank5_k{k}"] = float(found.rank5.mean())
    elif threshold is not None and math.isfinite(threshold):
        mated = found.enrolled
        out[f"dir_at_far_{far_name(OPEN_SET_FAR)}_k{k}"] = float((found.rank1[mated] & (found.top[mated] >= threshold)).mean())
        out[f"false_alarm_rate_k{k}"] = float((found.top[~mated] >= threshold).mean())
    return out


@dataclass
class Evaluation:
    """A split's figures ({name: value}), their intervals ({name: {value, low, high, method}}),
    the counts behind them, and the pairs (for the ROC and the score histograms)."""

    figures: dict[str, float]
    intervals: dict[str, dict[str, Any]]
    counts: dict[str, int]
    pairs: Pairs


def evaluate(embeddings: np.ndarray, people: np.ndarray, *, thresholds: dict[str, float] | None = None,
             seed: int = 0, resamples: int = RESAMPLES) -> Evaluation:
    """Verification, closed-set and open-set identification of a split, with the val split's
    `thresholds` (as `choose_thresholds` gives them); intervals unless `resamples` is 0."""
    thresholds = thresholds or {}
    e, y = np.asarray(embeddings, np.float32), np.asarray(people)
    pairs = make_pairs(e, y, seed=seed)
    verify_at = thresholds.get("verification")
    verify_at = verify_at if verify_at is not None and math.isfinite(verify_at) else None
    figures = roc_figures(pairs.score, pairs.same, threshold=verify_at)
    counts = {"people": len(np.unique(y)), "photos": len(y), "genuine_pairs": int(pairs.same.sum()),
              "impostor_pairs": int((~pairs.same).sum())}
    found: dict[tuple[int, bool], Searches] = {}
    for k in ENROLLED:
        for open_set in (False, True):
            s = searches(e, y, k=k, open_set=open_set, seed=seed)
            if s is None:
                continue
            found[(k, open_set)] = s
            figures.update(_identification_figures(s, k=k, threshold=thresholds.get(f"open_set_k{k}")))
        if (k, False) in found:
            counts[f"searches_k{k}"] = len(found[(k, False)].person)
    intervals = _intervals(pairs, y, found, figures, thresholds=thresholds, seed=seed, resamples=resamples) \
        if resamples else {}
    return Evaluation(figures=figures, intervals=intervals, counts=counts, pairs=pairs)


# ----------------------------------------------------------------------------- intervals


def _intervals(pairs: Pairs, people: np.ndarray, found: dict[tuple[int, bool], Searches], figures: dict[str, float],
               *, thresholds: dict[str, float], seed: int, resamples: int) -> dict[str, dict[str, Any]]:
    """The bootstrap over people of every figure (see the module docstring)."""
    names, index = np.unique(people, return_inverse=True)
    pa, pb = index[pairs.a], index[pairs.b]
    same = pairs.same.astype(int)
    cumulative, auroc = ranked(pairs.score, same), ranking(pairs.score, same, average_precision=False)
    verify_at = thresholds.get("verification")
    accepted = (pairs.score >= verify_at).astype(WEIGHT) if "accuracy" in figures else None
    search_index = {key: np.searchsorted(names, s.person) for key, s in found.items()}
    hits: dict[str, tuple[tuple[int, bool], np.ndarray, np.ndarray]] = {}  # name -> (searches, hit, counted)
    for (k, open_set), s in found.items():
        if not open_set:
            hits[f"rank1_k{k}"] = ((k, False), s.rank1, np.ones_like(s.rank1))
            hits[f"rank5_k{k}"] = ((k, False), s.rank5, np.ones_like(s.rank5))
        else:
            t = thresholds.get(f"open_set_k{k}")
            if t is not None and math.isfinite(t):
                hits[f"dir_at_far_{far_name(OPEN_SET_FAR)}_k{k}"] = ((k, True), s.rank1 & (s.top >= t), s.enrolled)
    hits = {n: v for n, v in hits.items() if n in figures}

    def figures_of(c: np.ndarray) -> dict[str, np.ndarray]:  # c: (b, people) draw counts
        w = np.where(pairs.same[None], c[:, pa], c[:, pa] * c[:, pb]).astype(WEIGHT)
        tp, fp = cumulative(w)
        tpr = np.c_[np.zeros(len(w)), tp / np.maximum(tp[:, -1:], 1e-12)]
        fpr = np.c_[np.zeros(len(w)), fp / np.maximum(fp[:, -1:], 1e-12)]
        out = {"auroc": auroc(w)["auroc"], "eer": eer_of(fpr, tpr)}
        for far in FARS:
            if f"tar_at_far_{far_name(far)}" in figures:
                out[f"tar_at_far_{far_name(far)}"] = tar_at(fpr, tpr, far)
        if accepted is not None:  # as pair_accuracy: TAR and TRR at the threshold, half each
            genuine, impostor = w * pairs.same, w * ~pairs.same
            # NaN for a resample without impostor pairs (one person drawn): left out of the interval
            out["accuracy"] = (ratio(genuine @ accepted, genuine.sum(1)) + ratio(impostor @ (1 - accepted),
                                                                                 impostor.sum(1))) / 2
        for name, (key, hit, counted) in hits.items():
            sw = c[:, search_index[key]] * counted.astype(WEIGHT)
            out[name] = (sw @ hit.astype(WEIGHT)) / np.maximum(sw.sum(1), 1e-12)
        return out

    # the people are the units drawn: bootstrap's weights (b, people) are how often each is drawn
    method = f"bootstrap over people, {resamples} resamples"
    drawn = bootstrap(figures_of, np.zeros(len(names), dtype=np.int64), resamples=resamples, seed=seed)
    return {name: around(figures[name], low, high, method) for name, (low, high) in drawn.items()}

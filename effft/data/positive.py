"""Which class of a binary data set is the positive one.

Sensitivity, specificity, PPV, the decision threshold, ROC and PR all speak of one class: the
positive one, the finding a test looks for. effft keeps it second (`classes[1]`) everywhere, so
the data are put in that order once, here, when they are loaded.

`metrics.positive_class` names it. Without it, a class whose name says it is a finding is taken
(`FINDING_WORDS`, one word of the name, with no word of `NEGATING_WORDS` beside it): "malignant"
over "benign_or_normal", "tumor" over "no_tumor", "yes" over "no". Where no class or both say
so, the second class as the data set orders it (label 1) stays positive.
"""

from __future__ import annotations

import re

FINDING_WORDS = frozenset({
    "malignant", "malignancy", "cancer", "carcinoma", "tumor", "tumour", "lesion", "melanoma", "metastasis",
    "positive", "abnormal", "abnormality", "disease", "diseased", "pathology", "pathological", "pneumonia",
    "covid", "infected", "infection", "fracture", "haemorrhage", "hemorrhage", "stroke", "glaucoma",
    "retinopathy", "referable", "defect", "defective", "anomaly", "fake", "fraud", "yes", "present", "true",
})
NEGATING_WORDS = frozenset({"no", "not", "non", "without", "free", "negative", "normal", "benign", "healthy",
                            "absent", "none", "false"})


def _words(name: str) -> set[str]:
    return set(re.split(r"[^a-z0-9]+", name.lower())) - {""}


def says_finding(name: str) -> bool:
    """Whether a class name says it is the finding ("Malignant", "tumor", "yes"; not "no_tumor")."""
    words = _words(name)
    return bool(words & FINDING_WORDS) and not words & NEGATING_WORDS


def positive_index(classes: list[str], given: str | None) -> tuple[int, str]:
    """The index of the positive class among two, and why it was chosen. `given` must be one of
    `classes` (checked by the caller, which knows where the name came from)."""
    if given is not None:
        return classes.index(given), "metrics.positive_class"
    named = [i for i, c in enumerate(classes) if says_finding(c)]
    if len(named) == 1:
        return named[0], "its name says so"
    return 1, "label 1 of the data set; no class name says it is the finding"

"""Which validation metric selects the prompt a run keeps (``--metric``), and why ``auto`` chose it.

``auto`` is accuracy for a classification task, macro-F1 where one label dominates the validation split (a
prompt answering it everywhere scores its share as accuracy), exact match for generation, the loss for a chat
task and for the LM objective. ``train``, ``tune`` and ``compare`` all select through :func:`primary_metric`.
"""

from __future__ import annotations

from collections import Counter

from softprompt.config import ConfigError
from softprompt.data import TaskFormat, is_chat


def dominance_threshold(n_labels: int) -> float:
    """The share of validation one of ``n_labels`` labels must reach for ``auto`` to select by macro-F1: a fifth
    of the way from an even split (``1/k``) to that label alone, ``(k + 4) / 5k``: 0.6 of two labels, 0.4 of four,
    0.28 of ten. One fixed share for every label count (0.6 was) treats a label at 45% of a 4-label split, 1.8 times
    its even share, as balanced."""
    k = max(2, n_labels)
    return (k + 4) / (5 * k)


def majority_share(examples: list, n_labels: int = 2) -> tuple[str, float] | None:
    """The most common label of ``examples`` and its share, when it is :func:`dominance_threshold` or more of
    ``n_labels`` labels (the task's; more when ``examples`` hold more): a prompt that answers it to everything
    scores that share as accuracy, and can be the best validated state by accuracy."""
    labels = [ex.label for ex in examples if ex.label is not None]
    if not labels:
        return None
    counts = Counter(labels)
    label, count = counts.most_common(1)[0]
    k = max(2, n_labels, len(counts))
    # count / n >= (k + 4) / 5k in integers: 6 of 10 at two labels is exactly the threshold
    return (label, count / len(labels)) if 5 * k * count >= (k + 4) * len(labels) else None


def primary_metric(fmt: TaskFormat, requested: str = "auto", examples: list | None = None) -> tuple[str, bool]:
    """The metric used for model selection and whether higher is better (a chat task: the loss, since a
    free-form reply rarely matches its reference exactly).

    ``auto`` on a classification task is accuracy, or macro-F1 when one label is :func:`dominance_threshold` or
    more of ``examples`` (the validation split the selection reads; 0.6 of two labels, 0.4 of four): there a
    prompt answering that label everywhere scores its share as accuracy, and macro-F1 weighs every label alike
    (:func:`metric_note` says so).

    Raises:
        ConfigError: a metric the task does not measure: the LM objective has only loss/perplexity, a
            classification task accuracy, macro-F1 and loss, a generation or chat task exact match, F1 and loss
            (it was a KeyError at the first validation, or every tune trial "diverged").
    """
    if fmt.objective == "lm":
        if requested not in ("auto", "loss"):
            raise ConfigError(f"--metric {requested} does not apply to --objective lm: it selects the prompt by "
                             "held-out loss (--metric loss or auto)")
        return "loss", False
    if fmt.is_classification:
        auto = "macro_f1" if majority_share(examples or [], len(fmt.labels)) else "accuracy"
    else:
        auto = "loss" if is_chat(fmt) else "exact_match"
    name = requested if requested != "auto" else auto
    measured = ("accuracy", "macro_f1", "loss") if fmt.is_classification else ("exact_match", "f1", "loss")
    if name not in measured:
        kind = "a classification task" if fmt.is_classification else ("a chat task" if is_chat(fmt) else
                                                                        "a generation task")
        raise ConfigError(f"--metric {name} is not measured on {kind}: use {', '.join(measured)} or auto")
    return name, name != "loss"


def metric_note(fmt: TaskFormat, examples: list, requested: str = "auto") -> str | None:
    """The console line saying why ``--metric auto`` selects by macro-F1 on this validation split, if it does
    (:func:`primary_metric`)."""
    if requested != "auto" or not fmt.is_classification or fmt.objective == "lm":
        return None
    found = majority_share(examples, len(fmt.labels))
    if found is None:
        return None
    label, share = found
    return (f"validation: label {label!r} is {share:.0%} of the {len(examples)} examples, so a prompt that answers "
            f"{label!r} to everything scores {share:.2f} accuracy: the prompt is selected by macro-F1 (--metric auto "
            "on such a split), which weighs every label alike; --metric accuracy selects by accuracy")

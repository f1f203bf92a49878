"""The search's winner against the untuned run, per example, on validation examples the search read and on
ones it did not.

A search keeps the best of several trials by one validation number, so some of its lead over the untuned run
(``--lr`` with the base prompt settings, the run ``softprompt train`` makes) is what picking the best of several
scores of the same examples gives by chance. Both kept prompts are scored again and compared per example
(:mod:`softprompt.stats`: accuracy by McNemar's exact test, macro-F1 by a paired bootstrap):

- on the validation examples the search ranked on (``--max-validation-samples`` of them): a lead there is
  optimistic, the winner was picked on them;
- on the rest of the validation split, when it has more examples than the search read (at most
  ``MAX_UNREAD``, a seeded sample): neither prompt was selected on them, so a lead there is the one to trust.
"""

from __future__ import annotations

import random

from softprompt.data import TaskFormat
from softprompt.stats import compare_predictions
from softprompt.tune.trials import TuneResult

ALPHA = 0.05  # a two-sided p below this reads as beyond chance
MAX_UNREAD = 2000  # validation examples the search did not read, scored at most (two prompts each)


def _predictions(folder, model, tokenizer, examples: list, fmt: TaskFormat, batch_size: int, max_length: int):
    import torch

    from softprompt.evaluate import evaluate_prompt
    from softprompt.forward import family_of
    from softprompt.store import load_prompt

    stored = load_prompt(str(folder), model)
    with torch.no_grad():
        kv = family_of(model).inference_prompt(model, stored.build_method()())
        _, preds = evaluate_prompt(model, tokenizer, kv, examples, fmt, batch_size, max_length=max_length,
                                   with_loss=False, bos=stored.bos)
    return preds


def compare_part(untuned_preds: list, winner_preds: list, labels: list[str], metric: str) -> dict:
    """One part's comparison; ``beyond_chance`` tests the metric the search ranked by (macro-F1 by its bootstrap,
    accuracy, and a search ranked by the loss, by McNemar's test): one test, not the better of two."""
    c = compare_predictions(untuned_preds, winner_preds, labels)
    f1 = c["macro_f1_diff"]
    if metric == "macro_f1":
        ahead = f1["p"] is not None and f1["p"] < ALPHA and f1["diff"] > 0
    else:
        ahead = c["mcnemar_p"] < ALPHA and c["b"]["accuracy"] > c["a"]["accuracy"]
    return {"n": c["n"], "winner_metrics": c["b"], "untuned_metrics": c["a"], "only_winner_right": c["only_b_right"],
            "only_untuned_right": c["only_a_right"], "mcnemar_p": c["mcnemar_p"], "macro_f1_diff": f1,
            "beyond_chance": ahead}


def unread_sample(examples: list, seed: int) -> list:
    """At most ``MAX_UNREAD`` of ``examples``, a seeded sample in split order."""
    if len(examples) <= MAX_UNREAD:
        return list(examples)
    keep = sorted(random.Random(f"{seed}:tune-unread").sample(range(len(examples)), MAX_UNREAD))
    return [examples[i] for i in keep]


def versus_untuned(result: TuneResult, model, tokenizer, examples: list, fmt: TaskFormat, batch_size: int,
                   max_length: int, unread: list | None = None) -> dict | None:
    """The winner and the untuned trial compared per example on ``examples`` (the validation examples the search
    ranked on) and on ``unread`` (validation examples it did not read; none: not compared there). ``None`` when
    there is nothing to compare (no winner, no untuned trial or it did not finish, or the untuned trial won). A
    task that is not label classification gets ``{"skipped": why}``.

    Returns:
        ``{"winner", "untuned", "selected_on", "not_read"}``: each part (``not_read`` ``None`` without unread
        examples) has ``n``, both sides' accuracy and macro-F1, the examples only one got right, McNemar's p, the
        macro-F1 difference's bootstrap (winner - untuned) and ``beyond_chance``.
    """
    best, untuned = result.best, result.untuned
    if best is None or untuned is None or untuned is best or untuned.status != "ok":
        return None
    if not fmt.is_classification or fmt.objective == "lm":
        return {"skipped": "the paired comparison is made for label classification tasks"}

    def compared(part: list) -> dict:
        untuned_preds, winner_preds = (_predictions(t.prompt_dir, model, tokenizer, part, fmt, batch_size, max_length)
                                       for t in (untuned, best))
        return compare_part(untuned_preds, winner_preds, fmt.labels, result.metric)

    return {"winner": best.id, "untuned": untuned.id, "selected_on": compared(examples),
            "not_read": compared(unread) if unread else None}


def _part_text(part: dict) -> str:
    w, u, f1 = part["winner_metrics"], part["untuned_metrics"], part["macro_f1_diff"]
    p_f1 = f"{f1['p']:.3g}" if f1["p"] else "< 0.001"
    return (f"accuracy {w['accuracy']:.4f} vs {u['accuracy']:.4f} ({w['accuracy'] - u['accuracy']:+.4f}, McNemar p "
            f"{part['mcnemar_p']:.3g}), macro-F1 {w['macro_f1']:.4f} vs {u['macro_f1']:.4f} ({f1['diff']:+.4f}, 95% "
            f"interval [{f1['low']:+.4f}, {f1['high']:+.4f}], bootstrap p {p_f1})")


def versus_line(report: dict, untuned_lr: float) -> str:
    """The console (and ``trials.md``) line of :func:`versus_untuned`'s report, with its verdict: from the
    examples the search did not read when there are some, else from those it was selected on (optimistic)."""
    if "skipped" in report:
        return f"the winner against the untuned run: not compared ({report['skipped']})"
    on, off = report["selected_on"], report["not_read"]
    text = (f"{report['winner']} against the untuned run ({report['untuned']}, lr {untuned_lr:g}): on the "
            f"{on['n']} validation examples both were selected on, {_part_text(on)}")
    if off is not None:
        text += f"; on {off['n']} validation examples the search did not read, {_part_text(off)}"
        if off["beyond_chance"]:
            return text + ": ahead beyond chance on examples it was not selected on"
        return (text + ": not ahead beyond chance on examples it was not selected on, so the search has not shown "
                "that it beats the untuned run")
    if on["beyond_chance"]:
        return text + ": ahead beyond chance (optimistic: it was picked on these examples)"
    return (text + ": within chance, so the search has not shown that it beats the untuned run; more validation "
            "examples (--max-validation-samples) or held-out data would tell them apart")

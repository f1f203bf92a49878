"""The search's winner against the untuned run, paired on the validation examples both were selected on.

A search keeps the best of several trials by one validation number, so some of its lead over the untuned run
(``--lr`` with the base prompt settings, the run ``softprompt train`` makes) is what picking the best of several
scores of the same examples gives by chance. Both kept prompts are scored again here on those examples, and
compared per example (:mod:`softprompt.stats`): accuracy by McNemar's exact test, macro-F1 by a paired
bootstrap. Even a difference beyond chance here is optimistic (the winner was picked on these examples);
within chance, the search has not shown that it beats the untuned run, and more validation examples
(``--max-validation-samples``) or held-out data would tell them apart.
"""

from __future__ import annotations

from softprompt.data import TaskFormat
from softprompt.stats import compare_predictions
from softprompt.tune.trials import TuneResult

ALPHA = 0.05  # a two-sided p below this reads as beyond chance


def _predictions(folder, model, tokenizer, examples: list, fmt: TaskFormat, batch_size: int, max_length: int):
    import torch

    from softprompt.evaluate import evaluate_prompt
    from softprompt.forward import family_of
    from softprompt.store import load_prompt

    stored = load_prompt(str(folder), model)
    with torch.no_grad():
        kv = family_of(model).inference_prompt(model, stored.build_method()())
        metrics, preds = evaluate_prompt(model, tokenizer, kv, examples, fmt, batch_size, max_length=max_length,
                                         with_loss=False, bos=stored.bos)
    return metrics, preds


def versus_untuned(result: TuneResult, model, tokenizer, examples: list, fmt: TaskFormat, batch_size: int,
                   max_length: int) -> dict | None:
    """The winner and the untuned trial compared per example on ``examples`` (the validation split the search
    ranked on); ``None`` when there is nothing to compare (no winner, no untuned trial or it did not finish, or
    the untuned trial won). A task that is not label classification gets ``{"skipped": why}``.

    Returns:
        ``{"winner", "untuned", "n", "winner_metrics", "untuned_metrics", "only_winner_right",
        "only_untuned_right", "mcnemar_p", "macro_f1_diff", "beyond_chance"}`` (differences: winner - untuned).
    """
    best, untuned = result.best, result.untuned
    if best is None or untuned is None or untuned is best or untuned.status != "ok":
        return None
    if not fmt.is_classification or fmt.objective == "lm":
        return {"skipped": "the paired comparison is made for label classification tasks"}
    _, untuned_preds = _predictions(untuned.prompt_dir, model, tokenizer, examples, fmt, batch_size, max_length)
    _, best_preds = _predictions(best.prompt_dir, model, tokenizer, examples, fmt, batch_size, max_length)
    c = compare_predictions(untuned_preds, best_preds, fmt.labels)
    f1 = c["macro_f1_diff"]
    beyond = (c["mcnemar_p"] < ALPHA and c["b"]["accuracy"] > c["a"]["accuracy"]) or (
        f1["p"] is not None and f1["p"] < ALPHA and f1["diff"] > 0)
    return {"winner": best.id, "untuned": untuned.id, "n": c["n"], "winner_metrics": c["b"],
            "untuned_metrics": c["a"], "only_winner_right": c["only_b_right"], "only_untuned_right": c["only_a_right"],
            "mcnemar_p": c["mcnemar_p"], "macro_f1_diff": f1, "beyond_chance": beyond}


def versus_line(report: dict, untuned_lr: float) -> str:
    """The console line of :func:`versus_untuned`'s report."""
    if "skipped" in report:
        return f"the winner against the untuned run: not compared ({report['skipped']})"
    w, u, f1 = report["winner_metrics"], report["untuned_metrics"], report["macro_f1_diff"]
    p_f1 = f"{f1['p']:.3g}" if f1["p"] else "< 0.001"
    head = (f"{report['winner']} against the untuned run ({report['untuned']}, lr {untuned_lr:g}) on the "
            f"{report['n']} validation examples both were selected on: accuracy {w['accuracy']:.4f} vs "
            f"{u['accuracy']:.4f} ({w['accuracy'] - u['accuracy']:+.4f}, McNemar p {report['mcnemar_p']:.3g}), "
            f"macro-F1 {w['macro_f1']:.4f} vs {u['macro_f1']:.4f} ({f1['diff']:+.4f}, 95% interval "
            f"[{f1['low']:+.4f}, {f1['high']:+.4f}], bootstrap p {p_f1})")
    if report["beyond_chance"]:
        return head + ": ahead beyond chance (optimistic: it was picked on these examples)"
    return (head + ": within chance, so the search has not shown that it beats the untuned run; more validation "
            "examples (--max-validation-samples) or held-out data would tell them apart")

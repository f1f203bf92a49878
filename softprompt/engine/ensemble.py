"""Combining the label scores of several prompts for one classification request."""

from __future__ import annotations

import torch

from softprompt.engine.requests import ClassifyResult


def combine(task: str, labels: list[str], scores: torch.Tensor, how: str, report_votes: bool) -> ClassifyResult:
    """One result from the members' label log-likelihoods.

    Args:
        labels: label names, aligned with the columns of ``scores``.
        scores: ``(M, L)`` log-likelihood of each label under each of ``M`` member prompts.
        how: ``mean`` averages the members' label probabilities (softmax over labels) and takes the most
            probable; ``vote`` takes the label most members pick, ties broken by the mean probability.
        report_votes: include the vote counts (ensembles).

    The result's ``scores`` are the ensemble's label log-likelihoods: the log of the members' mean likelihood
    (``logsumexp - log M``), the quantity ``Engine.score`` gives for an ensemble and a continuation, so the
    two APIs agree and a loss from these scores is the ensemble's own (not the mean of its members' losses).
    """
    probs = torch.softmax(scores, dim=-1)  # (M, L)
    mean = probs.mean(0)  # (L,)
    mixture = torch.logsumexp(scores, 0) - torch.log(torch.tensor(float(scores.shape[0]), dtype=scores.dtype))
    votes = torch.bincount(probs.argmax(-1), minlength=len(labels))  # (L,)
    if how == "vote":
        best = max(range(len(labels)), key=lambda j: (int(votes[j]), float(mean[j])))
    else:
        best = int(mean.argmax())
    return ClassifyResult(
        task=task, label=labels[best],
        probs={lab: float(p) for lab, p in zip(labels, mean, strict=True)},
        scores={lab: float(s) for lab, s in zip(labels, mixture, strict=True)},
        votes={lab: int(v) for lab, v in zip(labels, votes, strict=True)} if report_votes else None)

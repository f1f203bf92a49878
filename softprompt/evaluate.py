"""Evaluation: rank classification, generation exact match / F1 / ROUGE-L, loss, and baselines.

Every scored "prompt" is prepared once by the model's family (:mod:`softprompt.forward`; on a causal LM a
:class:`~softprompt.forward.PromptKV`): the tuned soft prompt, the init text as a hard prompt, or ``k``
solved training examples (k-shot). Hard prompts are the embeddings of real tokens at
positions ``0..n-1``, which is exactly prepending the text, and their keys/values are computed once for
the whole evaluation rather than once per row.

Where a causal LM's BOS goes (``bos`` arguments; :meth:`~softprompt.forward.Family.lead_ids` decides the
ids): each condition is laid out as the model reads it. No prompt: ``[BOS, text]``, as in pre-training. A
soft prompt: ``[prompt, BOS, text]``, PEFT's layout (``bos=True``; ``False`` for a prompt stored before
softprompt put the BOS there). A hard prompt or k-shot context is text the model reads first, so the BOS
opens it: ``[BOS, hard prompt, text]`` (:func:`hard_prompt_kv` with ``bos=True``, then the text with
``bos=False``), exactly the no-prompt layout of the two texts joined.
"""

from __future__ import annotations

import math
import random
import re
import string
from collections import Counter
from dataclasses import dataclass

import torch

from softprompt.data import (
    Batch,
    Encoded,
    Example,
    TaskFormat,
    batches,
    collate,
    encode_chat,
    is_chat,
    turn_end_ids,
    turn_end_text,
    with_leading,
    with_trailing,
)
from softprompt.data.chat import chat_prompt_ids, keep_end
from softprompt.embeddings import token_embeddings
from softprompt.forward import InferencePrompt, end_token_ids, family_of, generate, sliding_window


@dataclass
class Prediction:
    """One evaluated example: what was expected and what the model chose or produced."""

    source: str
    expected: str
    predicted: str


def hard_prompt_kv(model, tokenizer, text: str, bos: bool = True) -> InferencePrompt:
    """A text used as a hard prompt (token embeddings at positions 0..n-1), prepared as a soft prompt is
    (on a causal LM: its keys/values). With ``bos`` it starts with the model's BOS (if its tokenizer adds
    one): evaluate the text after it with ``bos=False``."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("hard prompt text is empty after tokenisation")
    ids = with_leading(ids, family_of(model).lead_ids(tokenizer, bos))
    emb = token_embeddings(model, ids)  # (n, H): the module's output, as for the text (scaled on Gemma)
    with torch.no_grad():
        return family_of(model).inference_prompt(model, emb)


def lead_prompt_kv(model, tokenizer) -> InferencePrompt | None:
    """The model's leading special tokens (its BOS) alone, prepared as a prompt; ``None`` for a tokenizer that
    adds none. Plain text read after it is read as in pre-training (the base-model row of an lm report)."""
    lead = family_of(model).lead_ids(tokenizer, True)
    if not lead:
        return None
    with torch.no_grad():
        return family_of(model).inference_prompt(model, token_embeddings(model, lead))


def shots_text(shots: list[Example]) -> str:
    """Solved examples as a k-shot context: each source, its target, a blank line."""
    return "".join(ex.source + ex.target + "\n\n" for ex in shots)


def k_shot_examples(examples: list[Example], fmt: TaskFormat, k: int, seed: int = 0) -> list[Example]:
    """``k`` examples drawn with ``seed`` (balanced over labels for classification), in context order. The
    ``k`` drawn include the ``k - 1`` that ``k - 1`` draws, so fewer shots take fewer tokens."""
    rng = random.Random(seed)
    pool = list(examples)
    rng.shuffle(pool)
    if fmt.is_classification:
        by_label: dict[str, list[Example]] = {}
        for ex in pool:
            by_label.setdefault(ex.label, []).append(ex)
        chosen: list[Example] = []
        while len(chosen) < k and any(by_label.values()):
            for label in fmt.labels:
                if by_label.get(label) and len(chosen) < k:
                    chosen.append(by_label[label].pop())
        rng.shuffle(chosen)
    else:
        chosen = pool[:k]
    return chosen


def macro_f1(expected: list[str], predicted: list[str], labels: list[str]) -> float:
    """Unweighted mean of per-label F1 over the labels that occur (expected or predicted).

    A label of the task that neither the data nor the predictions contain has no F1 (0/0): it is left out,
    as scikit-learn does, instead of counting as 0 (a class missing from a split would cap the score).
    """
    scores = []
    for lab in [lab for lab in labels if lab in expected or lab in predicted]:
        tp = sum(e == lab and p == lab for e, p in zip(expected, predicted, strict=True))
        fp = sum(e != lab and p == lab for e, p in zip(expected, predicted, strict=True))
        fn = sum(e == lab and p != lab for e, p in zip(expected, predicted, strict=True))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, articles and extra whitespace (SQuAD-style)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(expected: str, predicted: str) -> float:
    """Bag-of-words F1 between normalised answers."""
    e, p = normalize_answer(expected).split(), normalize_answer(predicted).split()
    common = sum((Counter(e) & Counter(p)).values())
    if not e or not p or common == 0:
        return float(e == p)
    prec, rec = common / len(p), common / len(e)
    return 2 * prec * rec / (prec + rec)


def rouge_l(expected: str, predicted: str) -> float:
    """ROUGE-L F-measure (beta 1) on normalised words: the longest common subsequence over both lengths.

    Our own few lines rather than the ``rouge-score`` package (unmaintained since 2022, and it pulls nltk and
    absl): the same LCS definition, with :func:`normalize_answer` words and no stemming.
    """
    e, p = normalize_answer(expected).split(), normalize_answer(predicted).split()
    if not e or not p:
        return float(e == p)
    prev = [0] * (len(p) + 1)  # LCS lengths of e[:i] against every prefix of p, one row at a time
    for a in e:
        row = [0]
        for j, b in enumerate(p):
            row.append(prev[j] + 1 if a == b else max(prev[j + 1], row[j]))
        prev = row
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(e)
    return 2 * prec * rec / (prec + rec)


@torch.no_grad()
def label_scores(model, tokenizer, prompt_kv, examples: list[Example], fmt: TaskFormat, batch_size: int,
                 max_length: int = 256, bos: bool = True) -> torch.Tensor:
    """A score per label for every example: ``(N, num_labels)``.

    On a language model a label's score is the summed log-probability of its tokens after the source (when
    every label is a single distinct token, a causal LM takes all scores from one forward per example); on
    a sequence classifier it is the log-softmax of its head's class logits. ``bos``: the source starts with
    the model's BOS (see the module docstring).
    """
    return family_of(model).label_scores(model, tokenizer, prompt_kv, examples, fmt, batch_size, max_length, bos)


@torch.no_grad()
def mean_target_loss(model, encoded: list[Encoded], pad_id: int, prompt_kv, batch_size: int) -> float:
    """Mean NLL per target token over a dataset."""
    family = family_of(model)
    total, count = 0.0, 0
    for batch in batches(encoded, batch_size, pad_id):
        batch = batch.to(model.device)
        n = int(batch.target_mask[:, 1:].sum())
        total += float(family.loss(model, batch, prompt_kv)) * n
        count += n
    return total / max(count, 1)


@torch.no_grad()
def generate_texts(model, tokenizer, prompt_kv, sources: list[str] | list[list[int]], max_new_tokens: int,
                   batch_size: int, stop: str | None = "\n", bos: bool = True, max_length: int | None = None,
                   end_ids: tuple[int, ...] = (), **sampling) -> list[str]:
    """Generate a continuation for each source, text or token ids (left-padded batches; on a model whose
    results the padding can change, :func:`~softprompt.forward.sliding_window`, batches of equal-length
    sources); cut at ``stop``.

    ``bos``: a text source starts with the model's BOS (see the module docstring); token ids (a rendered
    conversation) are taken as they are. ``max_length``: a longer text source keeps its BOS and its last
    tokens (where training and the final report's engine cut it). ``end_ids``: more ids that end a row besides
    the model's (a chat template's end of turn).
    """
    lead, trail = family_of(model).lead_ids(tokenizer, bos), family_of(model).trail_ids(tokenizer, bos)

    def ids_of(s: str | list[int]) -> list[int]:
        if isinstance(s, list):
            return s
        ids = with_trailing(tokenizer(s, add_special_tokens=False)["input_ids"], trail)
        ids = with_leading(ids, lead)
        room = max(max_length or 0, len(lead) + len(trail) + 1)
        if max_length is not None and len(ids) > room:  # the BOS and the EOS stay; the body keeps its end
            body = ids[len(lead):len(ids) - len(trail)]
            ids = ids[:len(lead)] + body[len(body) - (room - len(lead) - len(trail)):] + ids[len(ids) - len(trail):]
        return ids

    encoded = [ids_of(s) for s in sources]
    n = len(encoded)
    window, p = sliding_window(model), int(getattr(prompt_kv, "length", 0) or 0)
    if window is not None and max(map(len, encoded), default=0) + p + max_new_tokens > window:
        # a row could reach past its window: batches of one length, no padding to shift a row's window
        groups: list[list[int]] = []
        for i in sorted(range(n), key=lambda i: len(encoded[i])):
            if groups and len(groups[-1]) < batch_size and len(encoded[groups[-1][0]]) == len(encoded[i]):
                groups[-1].append(i)
            else:
                groups.append([i])
    else:
        groups = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    out: list[str] = [""] * n
    for group in groups:
        enc = [Encoded(encoded[i], 10**9) for i in group]
        batch: Batch = collate(enc, tokenizer.pad_token_id, padding_side="left").to(model.device)
        new = generate(model, batch.input_ids, batch.attention_mask, prompt_kv, max_new_tokens,
                       end_token_ids(model, tokenizer) + tuple(end_ids), **sampling)
        for i, ids in zip(group, new, strict=True):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            out[i] = text.split(stop)[0] if stop else text
    return out


def evaluate_prompt(model, tokenizer, prompt_kv, examples: list[Example], fmt: TaskFormat,
                    batch_size: int = 32, max_new_tokens: int = 16, max_length: int = 256,
                    with_loss: bool = True, bos: bool = True) -> tuple[dict[str, float], list[Prediction]]:
    """Metrics of one prompt on a list of examples.

    Classification: accuracy and macro-F1 by label log-likelihood (a classifier: its head's class
    log-probabilities). Generation: exact match, token F1 and ROUGE-L of greedy output. Both: mean target
    loss and perplexity when ``with_loss``. A chat task: :func:`evaluate_chat`. The LM objective
    (``fmt.objective == "lm"``): loss and perplexity over every scored token of the documents' chunks
    (``tokens``: how many), always. ``bos``: every source starts with the model's BOS (see the module
    docstring): True for a soft prompt trained by this version or by PEFT and for no prompt, False after a
    hard prompt from :func:`hard_prompt_kv` and for a prompt stored without the BOS (``StoredPrompt.bos``).
    """
    if not examples:
        raise ValueError("no examples to evaluate")
    family = family_of(model)
    problem = family.format_problem(model, fmt)
    if problem:
        raise ValueError(problem)
    if is_chat(fmt):
        return evaluate_chat(model, tokenizer, prompt_kv, examples, fmt, batch_size, max_new_tokens, max_length,
                             with_loss)
    metrics: dict[str, float] = {"n": float(len(examples))}
    if fmt.objective == "lm":  # plain text (softprompt.data.corpus): the held-out loss is the metric
        enc = family.encode_examples(tokenizer, examples, fmt, max_length)
        metrics["tokens"] = float(sum(len(e.input_ids) - e.target_start for e in enc))
        metrics.update(loss_metrics(mean_target_loss(model, enc, tokenizer.pad_token_id, prompt_kv, batch_size)))
        return metrics, []
    if fmt.is_classification:
        scores = label_scores(model, tokenizer, prompt_kv, examples, fmt, batch_size, max_length, bos)  # (N, L)
        predicted = [fmt.labels[i] for i in scores.argmax(-1).tolist()]
        expected = [ex.label for ex in examples]
        metrics.update(classification_metrics(expected, predicted, fmt.labels))
        preds = [Prediction(ex.source, e, p) for ex, e, p in zip(examples, expected, predicted, strict=True)]
    else:
        texts = generate_texts(model, tokenizer, prompt_kv, [ex.source for ex in examples], max_new_tokens,
                               batch_size, bos=bos, max_length=max_length)
        expected = [ex.target.strip() for ex in examples]
        metrics.update(generation_metrics(expected, texts))
        preds = [Prediction(ex.source, e, p.strip()) for ex, e, p in zip(examples, expected, texts, strict=True)]
    if with_loss and fmt.is_classification:
        # the gold label's score is the summed log-probability of its target tokens (a head's: its one
        # class): no second forward
        gold = torch.tensor([fmt.labels.index(ex.label) for ex in examples])
        lengths = torch.tensor(family.label_lengths(tokenizer, fmt))
        metrics.update(loss_metrics(float(-scores[torch.arange(len(examples)), gold].sum() / lengths[gold].sum())))
    elif with_loss:
        # the training encoding: the answer and the EOS that ends it (what training optimises and the engine's
        # report scores)
        enc = family.encode_examples(tokenizer, examples, fmt, max_length, bos)
        metrics.update(loss_metrics(mean_target_loss(model, enc, tokenizer.pad_token_id, prompt_kv, batch_size)))
    return metrics, preds


def evaluate_chat(model, tokenizer, prompt_kv, examples: list[Example], fmt: TaskFormat, batch_size: int = 32,
                  max_new_tokens: int = 64, max_length: int = 256,
                  with_loss: bool = True) -> tuple[dict[str, float], list[Prediction]]:
    """Metrics of one prompt on conversations (:class:`~softprompt.data.ChatExample`).

    The greedy reply to the conversation before its last assistant turn (rendered with the generation
    prompt; it ends at EOS or ``max_new_tokens``) is scored against that turn by exact match, token F1 and
    ROUGE-L. The loss and perplexity are per token over every assistant turn, as training counts them.
    """
    prompts, expected = [], []
    for ex in examples:
        last = ex.last_assistant
        ids = chat_prompt_ids(tokenizer, ex.messages[:last], fmt.chat_template)
        prompts.append(keep_end(tokenizer, ids, max_length))  # its BOS and its end, as training keeps it
        expected.append(ex.messages[last]["content"].strip())
    texts = [t.strip() for t in generate_texts(model, tokenizer, prompt_kv, prompts, max_new_tokens, batch_size,
                                               stop=turn_end_text(tokenizer, fmt.chat_template),
                                               end_ids=turn_end_ids(tokenizer, fmt.chat_template))]
    metrics: dict[str, float] = {"n": float(len(examples)), **generation_metrics(expected, texts)}
    if with_loss:
        enc = encode_chat(tokenizer, examples, fmt, max_length)
        metrics.update(loss_metrics(mean_target_loss(model, enc, tokenizer.pad_token_id, prompt_kv, batch_size)))
    preds = [Prediction(ex.source, e, p) for ex, e, p in zip(examples, expected, texts, strict=True)]
    return metrics, preds


def classification_metrics(expected: list[str], predicted: list[str], labels: list[str]) -> dict[str, float]:
    """Accuracy and macro-F1."""
    accuracy = sum(e == p for e, p in zip(expected, predicted, strict=True)) / len(expected)
    return {"accuracy": accuracy, "macro_f1": macro_f1(expected, predicted, labels)}


def generation_metrics(expected: list[str], texts: list[str]) -> dict[str, float]:
    """Exact match (normalised answers), token F1 and ROUGE-L."""
    pairs = list(zip(expected, texts, strict=True))
    return {"exact_match": sum(normalize_answer(e) == normalize_answer(p) for e, p in pairs) / len(pairs),
            "f1": sum(token_f1(e, p) for e, p in pairs) / len(pairs),
            "rouge_l": sum(rouge_l(e, p) for e, p in pairs) / len(pairs)}


def loss_metrics(loss: float) -> dict[str, float]:
    """Mean target-token loss and its perplexity (capped to stay finite)."""
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def format_report(report: dict[str, dict[str, float]]) -> str:
    """A plain-text table of ``{row: metrics}``."""
    cols = [c for c in ("accuracy", "macro_f1", "exact_match", "f1", "rouge_l", "loss", "perplexity", "n")
            if any(c in m for m in report.values())]
    width = max(len(r) for r in report) + 2
    lines = ["".ljust(width) + "".join(c.rjust(12) for c in cols)]
    for row, m in report.items():
        cells = []
        for c in cols:
            v = m.get(c)
            cells.append("-".rjust(12) if v is None else (f"{int(v)}" if c == "n" else f"{v:.4f}").rjust(12))
        lines.append(row.ljust(width) + "".join(cells))
    return "\n".join(lines)


def evaluate_on_engine(engine, runs: dict[str, str], examples: list[Example], fmt: TaskFormat,
                       max_new_tokens: int = 16) -> dict[str, dict[str, float]]:
    """Metrics of several engine tasks (tuned prompts, baselines) on the same examples, in shared batches.

    Args:
        engine: an :class:`softprompt.engine.Engine` holding the tasks.
        runs: report row name -> engine task name.
        examples: rendered examples (their sources are sent raw, so every task sees the same text).
        fmt: the task format (labels, or free-text targets).

    Returns:
        Row name -> metrics, as :func:`evaluate_prompt` reports them.
    """
    from softprompt.engine import ClassifyRequest, GenerateRequest, ScoreRequest

    if not examples:
        raise ValueError("no examples to evaluate")
    n = len(examples)
    report: dict[str, dict[str, float]] = {}
    if fmt.is_classification:
        reqs = [ClassifyRequest(task, ex.source, raw=True) for task in runs.values() for ex in examples]
        results = engine.classify(reqs)
        # the loss per target token; a classifier head's "target" is one class
        lengths = dict(zip(fmt.labels, engine.family.label_lengths(engine.tok, fmt), strict=True))
        expected = [ex.label for ex in examples]
        for k, row in enumerate(runs):
            res = results[k * n:(k + 1) * n]
            predicted = [r.label for r in res]
            loss = -sum(r.scores[e] for r, e in zip(res, expected, strict=True)) / sum(lengths[e] for e in expected)
            report[row] = {"n": float(n), **classification_metrics(expected, predicted, fmt.labels),
                           **loss_metrics(loss)}
        return report
    gens = engine.generate([GenerateRequest(task, ex.source, raw=True, max_tokens=max_new_tokens, stop=["\n"])
                            for task in runs.values() for ex in examples])
    eos = engine.tok.eos_token_id is not None  # training ends every answer with it (append_eos)
    scores = engine.score([ScoreRequest(task, ex.source, ex.target, raw=True, eos=eos)
                           for task in runs.values() for ex in examples])
    expected = [ex.target.strip() for ex in examples]
    for k, row in enumerate(runs):
        texts = [g.text for g in gens[k * n:(k + 1) * n]]
        sc = scores[k * n:(k + 1) * n]
        loss = -sum(s.logprob for s in sc) / sum(len(s.tokens) for s in sc)
        report[row] = {"n": float(n), **generation_metrics(expected, texts), **loss_metrics(loss)}
    return report

"""Tokenise examples and pad them into batches with a mask over the target tokens.

Source and target are tokenised separately (no special tokens) and concatenated, so the target tokens
of a classification example are exactly the tokens of its label text: the same ids that rank
classification scores at evaluation time. A causal LM's source starts with the tokenizer's leading
special tokens (its BOS, :func:`leading_special_ids`; the caller passes them as ``lead``), as the model
saw text in pre-training and as PEFT lays it out after a prompt: ``[prompt, BOS, source, target]``.
Over-long examples lose tokens from the start of the source, after the BOS; the target is always kept
whole.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from softprompt.data.formats import DataError
from softprompt.data.template import Example, example_name

IGNORE_INDEX = -100


@dataclass
class Encoded:
    """Token ids of one example: ``input_ids[:target_start]`` is the source, the rest the target.

    ``class_label`` is the label's index for sequence classification (:func:`encode_classes`), which has
    no target tokens. ``target_mask`` (one bool per token) marks several target spans instead (a chat
    conversation's assistant turns, :func:`softprompt.data.chat.encode_chat`); ``target_start`` is then the
    first target token.
    """

    input_ids: list[int]
    target_start: int
    class_label: int | None = None
    target_mask: list[bool] | None = None


def leading_special_ids(tokenizer) -> list[int]:
    """The special tokens ``tokenizer(text)`` puts before the text's own ids: ``[BOS]`` on Llama, Gemma and
    Mistral tokenizers, ``[]`` on GPT-2, SmolLM2 and Qwen2 (which add none) and on T5 (EOS at the end only).

    Found by comparing one text tokenised with and without special tokens, not from ``add_bos_token``,
    which not every tokenizer class has (and some that add a BOS through their post-processor report False).
    An encoder's ``[CLS]`` comes out here too; encoder classifiers tokenise with their special tokens
    themselves (:func:`encode_classes`) and do not use this.
    """
    return _special_ids_around(tokenizer)[0]


def trailing_special_ids(tokenizer) -> list[int]:
    """The special tokens ``tokenizer(text)`` puts after the text's own ids: ``[</s>]`` on T5 (its encoder
    reads every input closed by it, in pre-training and in PEFT's prompt tuning), ``[]`` on GPT-2, Llama and
    most decoder tokenizers. Found as :func:`leading_special_ids` is."""
    return _special_ids_around(tokenizer)[1]


def _special_ids_around(tokenizer) -> tuple[list[int], list[int]]:
    """The ids ``tokenizer`` adds before and after one probe text's own ids (none when the text's ids change
    with special tokens: nothing can safely be put around it)."""
    probe = "a"
    with_special = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    if not plain:
        return [], []
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start:start + len(plain)] == plain:
            return with_special[:start], with_special[start + len(plain):]
    return [], []


def with_trailing(ids: Sequence[int], trail: Sequence[int]) -> list[int]:
    """``ids + trail``, unless ``ids`` already end with ``trail``."""
    ids, trail = list(ids), list(trail)
    return ids if not trail or ids[len(ids) - len(trail):] == trail else ids + trail


def with_leading(ids: Sequence[int], lead: Sequence[int]) -> list[int]:
    """``lead + ids``, unless ``ids`` already start with ``lead`` (a chat template's rendered
    ``<|begin_of_text|>``/``<bos>`` is tokenised to the BOS id: the text must not get a second one)."""
    ids, lead = list(ids), list(lead)
    return ids if ids[:len(lead)] == lead else lead + ids


def encode(tokenizer, examples: list[Example], max_length: int = 256, append_eos: bool = False,
           lead: Sequence[int] = (), trail: Sequence[int] = (), target_room: int = 0) -> list[Encoded]:
    """Tokenise examples into source + target ids.

    Args:
        tokenizer: a Hugging Face tokenizer (fast ones are batched in Rust).
        examples: rendered examples.
        max_length: most tokens per example, ``lead`` included; longer sources are cut from the start,
            after ``lead``.
        append_eos: end every target with ``tokenizer.eos_token_id`` (teaches the model to stop
            after a generated answer).
        lead: ids every source starts with (a causal LM's BOS: the family's ``lead_ids``); a source whose
            text already starts with them does not get them twice. Targets never get special tokens.
        trail: ids every source ends with (an encoder-decoder's ``</s>``: the family's ``trail_ids``); kept
            when the source is cut, counted in ``max_length``.
        target_room: tokens a long source leaves for its target at least (a classification task: its longest
            label's, :func:`label_room`, so that a source is cut alike whichever label follows it: in
            training, behind the gold label, and when each label is scored).

    Returns:
        One :class:`Encoded` per example, in order.

    Raises:
        DataError: a target with no tokens, a target (with ``lead``) longer than ``max_length``, or
            ``append_eos`` without an EOS token.
    """
    if max_length < 1:
        raise DataError(f"--max-length must be >= 1, got {max_length}")
    if not examples:
        return []
    eos: list[int] = []
    if append_eos:
        if tokenizer.eos_token_id is None:
            raise DataError("append_eos needs a tokenizer with an EOS token; this one has none")
        eos = [int(tokenizer.eos_token_id)]
    lead, trail = list(lead), list(trail)
    if target_room and target_room + len(lead) + len(trail) >= max_length:  # every source would be cut to nothing
        raise DataError(f"the longest label takes {target_room} tokens"
                        + (f" (+{len(lead) + len(trail)} special)" if lead or trail else "")
                        + f": --max-length {max_length} leaves no token of the input; raise --max-length")
    # one batched call per side; add_special_tokens=False keeps BOS/EOS out of the concatenation (the
    # source's BOS is ``lead``, put in front here)
    sources = tokenizer([e.source for e in examples], add_special_tokens=False)["input_ids"]
    targets = tokenizer([e.target for e in examples], add_special_tokens=False)["input_ids"]
    out: list[Encoded] = []
    for i, (example, src, tgt) in enumerate(zip(examples, sources, targets, strict=True)):
        if not tgt:
            raise DataError(f"{example_name(example, i)}: target {example.target!r} has no tokens")
        tgt = list(tgt) + eos
        specials = len(lead) + len(trail)
        if len(tgt) + specials > max_length:
            raise DataError(f"{example_name(example, i)}: target {example.target[:60]!r} has {len(tgt)} tokens"
                            + (f" (+{len(lead)} leading special)" if lead else "")
                            + (f" (+{len(trail)} trailing special)" if trail else "")
                            + f", more than --max-length {max_length}")
        body = list(src)
        if lead and body[:len(lead)] == lead:  # the rendered text already starts with the BOS
            body = body[len(lead):]
        if trail and body[len(body) - len(trail):] == trail:  # ... or ends with the EOS
            body = body[:len(body) - len(trail)]
        keep = max_length - max(len(tgt), target_room) - specials
        src = lead + (body[len(body) - keep:] if len(body) > keep else body) + trail
        out.append(Encoded(input_ids=src + tgt, target_start=len(src)))
    return out


def text_tail(tokenizer, text: str, n: int) -> str:
    """The shortest end of ``text`` that keeps its last ``n`` tokens (no special tokens): a source cut as
    :func:`encode` cuts it, kept as text (a k-shot context is tokenised whole). ``text`` itself when it has no
    more than ``n`` tokens; ``""`` for ``n <= 0``. Found by bisection over characters, with any tokenizer."""

    def count(start: int) -> int:
        return len(tokenizer(text[start:], add_special_tokens=False)["input_ids"])

    if count(0) <= n:
        return text
    lo, hi = 0, len(text)  # count(lo) > n >= count(hi) (the empty end has no tokens)
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        if count(mid) <= n:
            hi = mid
        else:
            lo = mid
    return text[hi:]


def label_room(tokenizer, fmt) -> int:
    """Tokens the longest label text takes as a target (0 for a task without labels): what a classification
    source leaves room for (:func:`encode`'s ``target_room``).

    Raises:
        DataError: a label that can never be predicted (:func:`label_prefix_problem`).
    """
    if not fmt.is_classification:
        return 0
    problem = label_prefix_problem(tokenizer, fmt)
    if problem:
        raise DataError(problem)
    return max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in fmt.label_texts)


def label_prefix_problem(tokenizer, fmt) -> str | None:
    """Why some label can never be predicted, or None. A label is scored by the summed log-probability of its
    tokens (no end marker after them), so a label whose tokens begin with all of another's always scores lower
    (the other's score plus more negative terms), and of two labels with the same tokens the first always wins:
    with a digit-splitting tokenizer, " 10" is " 1" + "0"; " yes." is " yes" + "."."""
    ids = {label: tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
           for label, text in zip(fmt.labels, fmt.label_texts, strict=True)}
    for a, short in ids.items():
        for b, long in ids.items():
            if a != b and long[:len(short)] == short and (len(long) > len(short) or a < b):
                why = ("tokenize alike, so the first always wins" if len(long) == len(short) else
                       f"{b!r}'s tokens begin with all of {a!r}'s, so its summed log-probability is always lower "
                       "and it can never be predicted")
                return (f"--verbalizer: labels {a!r} and {b!r} ({list(short)} and {list(long)}) {why}; give them "
                        "texts that differ within the shorter one's tokens (another word)")
    return None


def encode_classes(tokenizer, examples: list[Example], labels: list[str], max_length: int = 256) -> list[Encoded]:
    """Tokenise examples for a sequence classifier: the source with the tokenizer's special tokens
    (``[CLS] ... [SEP]``), cut at ``max_length`` tokens, and the index of the label in ``labels``.

    Raises:
        DataError: an example without a label, or with a label not in ``labels``.
    """
    if max_length < 1:
        raise DataError(f"--max-length must be >= 1, got {max_length}")
    if not examples:
        return []
    index = {label: i for i, label in enumerate(labels)}
    bad = [(i, e.label) for i, e in enumerate(examples) if e.label not in index]
    if bad:
        i, label = bad[0]
        raise DataError(f"{example_name(examples[i], i)}: label {label!r} is not one of the task's labels {labels} "
                        f"({len(bad)} such examples)")
    ids = tokenizer([e.source for e in examples], truncation=True, max_length=max_length)["input_ids"]
    return [Encoded(list(x), len(x), index[e.label]) for x, e in zip(ids, examples, strict=True)]


@dataclass
class Batch:
    """A padded batch.

    Attributes:
        input_ids: ``(B, T)`` long token ids, padding filled with the pad id.
        attention_mask: ``(B, T)`` long, 1 at real tokens.
        target_mask: ``(B, T)`` bool, True at target tokens (the positions whose tokens are predicted).
        class_labels: ``(B,)`` long label indices (sequence classification), else None.
    """

    input_ids: Tensor
    attention_mask: Tensor
    target_mask: Tensor
    class_labels: Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        """A copy of the batch on ``device``."""
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.target_mask.to(device),
                     None if self.class_labels is None else self.class_labels.to(device))

    @property
    def num_tokens(self) -> int:
        """Number of real (non-padding) tokens."""
        return int(self.attention_mask.sum())


    @property
    def labels(self) -> Tensor:
        """``(B, T)`` long: the token ids at target positions, -100 elsewhere (HF loss convention)."""
        return self.input_ids.masked_fill(~self.target_mask, IGNORE_INDEX)


def collate(items: list[Encoded], pad_id: int, padding_side: str = "right") -> Batch:
    """Pad encoded examples to the longest one.

    Args:
        items: at least one encoded example.
        pad_id: id written at padding positions (masked out by ``attention_mask``).
        padding_side: ``"right"`` (training) or ``"left"`` (generation: every row ends at position T-1).

    Raises:
        DataError: no items, or an unknown padding side.
    """
    if padding_side not in ("left", "right"):
        raise DataError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not items:
        raise DataError("cannot collate an empty list of examples")
    width = max(len(item.input_ids) for item in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)  # (B, T)
    target_mask = torch.zeros((len(items), width), dtype=torch.bool)  # (B, T)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        start = width - n if padding_side == "left" else 0
        input_ids[row, start:start + n] = torch.tensor(item.input_ids, dtype=torch.long)
        attention_mask[row, start:start + n] = 1
        if item.target_mask is not None:  # several target spans
            target_mask[row, start:start + n] = torch.tensor(item.target_mask, dtype=torch.bool)
        else:
            target_mask[row, start + item.target_start:start + n] = True
    classes = [item.class_label for item in items]
    if any(c is not None for c in classes) and None in classes:
        raise DataError("cannot collate examples with and without class labels into one batch")
    class_labels = None if classes[0] is None else torch.tensor(classes, dtype=torch.long)  # (B,)
    return Batch(input_ids, attention_mask, target_mask, class_labels)


def batches(encoded: list[Encoded], batch_size: int, pad_id: int, shuffle: bool = False, seed: int = 0,
            padding_side: str = "right") -> Iterator[Batch]:
    """Yield padded batches of ``batch_size`` examples (the last one may be smaller).

    Args:
        encoded: encoded examples.
        batch_size: examples per batch.
        pad_id: padding id.
        shuffle: visit the examples in a ``random.Random(seed)`` permutation instead of in order.
        seed: shuffling seed; pass e.g. ``base_seed + epoch`` for a new order every epoch.
        padding_side: see :func:`collate`.

    Raises:
        DataError: ``batch_size`` below 1.
    """
    if batch_size < 1:
        raise DataError(f"--batch-size must be >= 1, got {batch_size}")
    if padding_side not in ("left", "right"):
        raise DataError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    order = list(range(len(encoded)))
    if shuffle:
        random.Random(seed).shuffle(order)
    # checks above run at call time; the batches themselves are built lazily
    return (collate([encoded[j] for j in order[i:i + batch_size]], pad_id, padding_side)
            for i in range(0, len(order), batch_size))


def token_counts(tokenizer, examples: Sequence[Example]) -> Counter:
    """How often each token id occurs in the examples' sources (a corpus document, which has no source: its
    text), without special tokens: what ``--init sample_vocab`` draws the prompt's tokens from."""
    return Counter(t for ex in examples
                   for t in tokenizer(ex.source or ex.target, add_special_tokens=False)["input_ids"])

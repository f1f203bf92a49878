"""One entry point from command-line data flags to rendered examples: :func:`load_task`."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from softprompt.data.builtin import DEFAULT_SEED, SPLITS, builtin_spec, load_builtin
from softprompt.data.chat import MESSAGES_FIELD, ChatFormat, is_chat_record
from softprompt.data.formats import DataError, load_records_with_lines
from softprompt.data.template import Example, TaskFormat

SPLIT_FLAGS = {"train": "--train-file", "validation": "--validation-file", "test": "--test-file"}

log = logging.getLogger("softprompt")


@dataclass
class TaskData:
    """A task's format and its rendered splits (``train``/``validation``/``test``, whichever exist)."""

    format: TaskFormat
    splits: dict[str, list[Example]]

    def examples(self, split: str) -> list[Example]:
        """Examples of one split.

        Raises:
            DataError: the split is absent (the message names the flag that provides it).
        """
        if split not in self.splits:
            flag = SPLIT_FLAGS.get(split, "a data file")
            raise DataError(f"no {split!r} split (have: {', '.join(self.splits) or 'none'}); "
                            f"pass {flag} or a --dataset that has it")
        return self.splits[split]


def order_verbalizer(verbalizer: dict[str, str] | None, labels) -> dict[str, str] | None:
    """``verbalizer`` with its labels in the recorded order ``labels`` when both name the same labels.

    A stored prompt records its label order separately (a classification head's outputs are in that order)
    because the verbalizer is stored as a JSON object, whose key order is not kept. Otherwise unchanged.
    """
    if verbalizer and isinstance(labels, list) and set(labels) == set(verbalizer):
        return {label: verbalizer[label] for label in labels}
    return verbalizer


def parse_verbalizer(spec: str | dict) -> dict[str, str]:
    """Parse a verbalizer given as ``"positive=great,negative=terrible"`` or as a dict.

    Whitespace around labels is dropped; the texts are kept as written apart from surrounding
    whitespace (the task's ``target_prefix`` supplies the separating space).

    Raises:
        DataError: bad syntax, empty labels or texts, or a repeated label; the message names --verbalizer.
    """
    if isinstance(spec, dict):
        # a YAML mapping: `1: yes` has an int label and a boolean text (YAML reads yes/no/on/off as booleans)
        odd = [x for x in (*spec, *spec.values()) if isinstance(x, bool) or not isinstance(x, str | int | float)]
        if odd:
            raise DataError(f"--verbalizer {spec!r}: labels and texts must be text or numbers, got {odd[0]!r}"
                            + (" (YAML reads yes/no/on/off/true/false as booleans: quote it)"
                               if isinstance(odd[0], bool) else ""))
        out = {str(k).strip(): str(v).strip() for k, v in spec.items()}
        bad = [k for k, v in out.items() if not k or not v]
        if not out or bad:
            raise DataError(f"--verbalizer {spec!r}: every label and text must be non-empty")
        return out
    if not isinstance(spec, str):
        raise DataError("--verbalizer must be 'label=text,label=text' or a mapping, "
                        f"got {type(spec).__name__}")
    out: dict[str, str] = {}
    problems: list[str] = []
    for part in spec.split(","):
        label, sep, text = part.partition("=")
        label, text = label.strip(), text.strip()
        if not sep or not label or not text:
            problems.append(f"{part.strip()!r} is not label=text")
        elif label in out:
            problems.append(f"label {label!r} appears twice")
        else:
            out[label] = text
    if problems:
        raise DataError(f"--verbalizer {spec!r}: {'; '.join(problems)} "
                        "(expected e.g. 'positive=great,negative=terrible')")
    return out


def _cap(examples: list[Example], limit: int, seed: int, split: str) -> list[Example]:
    if len(examples) <= limit:
        return examples
    # a seeded random subset, kept in the original order; the split name in the seed makes the
    # subsets of different splits independent of each other
    keep = sorted(random.Random(f"{seed}:{split}").sample(range(len(examples)), limit))
    return [examples[i] for i in keep]


def _chat_files(files: dict[str, Path]) -> bool:
    """True when the data files hold chat records (their first record has a ``messages`` list).

    Raises:
        DataError: some files hold chat records and others do not.
    """
    kinds = {}
    for path in files.values():
        records, _ = load_records_with_lines(path)
        kinds[path.name] = is_chat_record(records[0])
    if len(set(kinds.values())) > 1:
        chat = [n for n, c in kinds.items() if c]
        other = [n for n, c in kinds.items() if not c]
        raise DataError(f"{', '.join(chat)} hold chat records (a 'messages' list) but {', '.join(other)} do not: "
                        "give every split in one format")
    return all(kinds.values())


def load_task(
    dataset: str | None = None,
    train_file: str | Path | None = None,
    validation_file: str | Path | None = None,
    test_file: str | Path | None = None,
    template: str | None = None,
    target_field: str | None = None,
    verbalizer: dict[str, str] | str | None = None,
    max_samples: dict[str, int] | None = None,
    seed: int = DEFAULT_SEED,
    chat_template: str | None = None,
    target_prefix: str | None = None,
) -> TaskData:
    """Load and render a task from a built-in dataset and/or data files.

    Args:
        dataset: built-in dataset name (``rotten_tomatoes``, ``capitals``); provides splits and a
            default format.
        train_file: records for the ``train`` split (replaces the built-in one).
        validation_file: records for the ``validation`` split.
        test_file: records for the ``test`` split.
        template: prompt template; overrides the built-in default, required for files alone.
        target_field: answer field; overrides the built-in default, required for files alone.
        verbalizer: label -> text (or ``"a=x,b=y"``); makes the task classification.
        max_samples: per-split cap, e.g. ``{"train": 1000}``; a seeded random subset is kept.
        seed: seed of the built-in split and of the ``max_samples`` subsets.
        chat_template: Jinja chat template text for chat records (default: the tokenizer's own).
        target_prefix: text before every target (``None``: the format's own, a space); a stored prompt's
            recorded one, so that it is scored on the targets it was trained on.

    Data files whose records hold a ``messages`` list, given without ``--template``, are a chat task
    (:class:`~softprompt.data.chat.ChatFormat`).

    Returns:
        The task format and rendered examples of every available split.

    Raises:
        DataError: missing/unknown dataset or flags, unreadable files, or invalid records (all listed).
    """
    files = {"train": train_file, "validation": validation_file, "test": test_file}
    files = {split: Path(f) for split, f in files.items() if f is not None}
    verb = parse_verbalizer(verbalizer) if verbalizer is not None else None
    problems: list[str] = []
    if max_samples:
        for split, n in max_samples.items():
            if split not in SPLITS:
                problems.append(f"--max-samples names unknown split {split!r} (splits: {', '.join(SPLITS)})")
            elif not isinstance(n, int) or n < 1:
                problems.append(f"--max-samples for {split!r} must be a positive integer, got {n!r}")

    if dataset is not None:
        spec = builtin_spec(dataset)
        base = spec.format
        fmt_args = {"template": template if template is not None else base.template,
                    "target_field": target_field if target_field is not None else base.target_field,
                    "verbalizer": verb if verb is not None else base.verbalizer,
                    "target_prefix": base.target_prefix}
        if fmt_args["verbalizer"] is not None:
            fmt_args["verbalizer"] = dict(fmt_args["verbalizer"])
    elif files and template is None and verb is None and _chat_files(files):
        fmt_args = {"chat_template": chat_template}
        if target_field is not None and target_field != MESSAGES_FIELD:  # a stored chat task's is 'messages'
            problems.append(f"--target-field {target_field} does not apply to chat records (the targets are the "
                            "assistant turns of 'messages'): leave --target-field out")
    else:
        if not files:
            problems.append("no data: pass --dataset or --train-file/--validation-file/--test-file")
        for value, flag in ((template, "--template"), (target_field, "--target-field")):
            if value is None:
                problems.append(f"{flag} is required for data files without a built-in --dataset")
        fmt_args = {"template": template, "target_field": target_field, "verbalizer": verb}
    if problems:
        raise DataError("; ".join(problems))
    if target_prefix is not None and "chat_template" not in fmt_args:  # a stored prompt's, as it was trained
        fmt_args["target_prefix"] = target_prefix
    fmt = ChatFormat(**fmt_args) if "chat_template" in fmt_args else TaskFormat(**fmt_args)
    if chat_template is not None and not isinstance(fmt, ChatFormat):  # it was silently unused
        raise DataError("--chat-template renders chat records (a 'messages' list, without --template); this task "
                        "is a template task: leave --chat-template out")

    splits: dict[str, list[Example]] = {}
    if dataset is not None:
        for split, records in load_builtin(dataset, seed).items():
            if split not in files:
                splits[split] = fmt.validate_records(records, f"{dataset}/{split}")
    for split in SPLITS:  # file splits in canonical order
        if split in files:
            records, lines = load_records_with_lines(files[split])
            splits[split] = fmt.validate_records(records, files[split].name, lines)
    splits = {s: splits[s] for s in SPLITS if s in splits}
    for split, limit in (max_samples or {}).items():
        if split in splits:
            splits[split] = _cap(splits[split], limit, seed, split)
    warn_overlap(splits, files)
    _warn_coverage(splits, fmt)
    return TaskData(format=fmt, splits=splits)


def _warn_coverage(splits: dict[str, list[Example]], fmt: TaskFormat) -> None:
    """Warn when the training split lacks a verbalizer label (the prompt never sees it as an answer), and per
    held-out split, when it holds labels the training split has none of (its numbers rest on classes never
    trained)."""
    if not fmt.is_classification or not splits.get("train"):
        return
    trained = {ex.label for ex in splits["train"]}
    missing = [label for label in fmt.labels if label not in trained]
    if missing:
        log.warning("the train split has no example of verbalizer label(s) %s: the prompt never learns to answer "
                    "them", ", ".join(map(repr, missing)))
    for split in ("validation", "test"):
        absent = sorted({ex.label for ex in splits.get(split, [])} - trained)
        if absent:
            log.warning("the %s split holds label(s) %s that no train example has", split,
                        ", ".join(map(repr, absent)))


def example_key(ex: Example) -> tuple:
    """What makes two examples the same: their input and answer, or their conversation."""
    return ex.source, ex.target, repr(getattr(ex, "messages", None))


def examples_digest(examples: list[Example]) -> str:
    """A short hash of which examples a split holds (their :func:`example_key`, in any order): a record of a
    split that a later run rebuilds, to check it rebuilt the same examples, not only as many."""
    import hashlib

    h = hashlib.sha256()
    for key in sorted(json.dumps(list(example_key(ex))) for ex in examples):
        h.update(key.encode("utf-8", "surrogatepass") + b"\n")
    return h.hexdigest()[:16]


def overlap(splits: dict[str, list[Example]]) -> dict[tuple[str, str], int]:
    """Per pair ``(held-out split, earlier split)``: (validation, train), (test, train), (test, validation): how
    many of the held-out split's examples also appear in the earlier one (same input and answer, or the same
    conversation)."""
    keys = {s: {example_key(e) for e in splits[s]} for s in ("train", "validation") if splits.get(s)}
    return {(s, other): sum(example_key(e) in keys[other] for e in splits[s])
            for s, other in (("validation", "train"), ("test", "train"), ("test", "validation"))
            if s in splits and other in keys}


def warn_overlap(splits: dict[str, list[Example]], files: dict, same: str = "same input and answer") -> None:
    """Warn when a user file's held-out split repeats training examples (the same file given twice, or files
    that share records), or the test split repeats validation examples (model selection saw them): its numbers
    would partly measure memorisation or selection, with no sign of it. ``same``: what equal examples share."""
    for (split, other), n in overlap(splits).items():
        if n and (split in files or other in files):
            log.warning("%d of the %d %s examples also appear in the %s split (%s): the %s "
                        "numbers partly measure %s; deduplicate the files", n, len(splits[split]), split, other,
                        same, split, "recall of training examples" if other == "train" else
                        "examples the best step was selected on")

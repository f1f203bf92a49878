"""Iteration-level (continuous) batching: generations join and leave the running batch at every step.

A :class:`RunningBatch` holds the rows being generated. Each :meth:`~RunningBatch.step` runs one decode
forward for every row that has its input (one new token per row), then one prefill forward over the rows
still reading their input, at most ``prefill_chunk`` input tokens in all, so a long input joins over a few
steps instead of stalling the running rows. A row that finishes (EOS, a stop string, its max tokens, its
client gone) leaves at once and its slot is reused; :meth:`~RunningBatch.admit` adds a row between steps.
Each row keeps its own prompt (the one it joined with), positions, sampler, stop strings and max tokens,
so its result is the one it gets alone (tests compare with solo runs and one-row uncached decodes).

Keys/values live in per-row slots (:mod:`softprompt.forward.slots`): a step writes only its new tokens;
the prompts' keys/values are shared by reference, never copied per row. Slots are kept in two contiguous
ranges, decoding rows first, so each forward attends to a view of the slots.

A forward that raises is run again on each half of its rows (writes are idempotent: a row's length moves
only after its forward succeeded) until the failing row fails alone; the others go on.

On a model whose rotary embedding a forward picks by its largest position (longrope: :func:`rope_switch`),
rows before and past that length run in separate forwards, and no prefill chunk crosses it: a token is read
with the factors of its own position, whatever else runs and however the input was cut in chunks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from softprompt.engine.requests import EngineError, GenerateResult, RequestError
from softprompt.forward import (
    PromptKV,
    RowSampling,
    TokenLogprob,
    logits_from_hidden,
    rope_switch,
    sample_next,
    token_logprobs,
)
from softprompt.forward.slots import SlotKV, slot_forward

log = logging.getLogger(__name__)

OnToken = Callable[[list[int], list[TokenLogprob] | None], None]
Done = Callable[[GenerateResult | BaseException], None]


@dataclass(eq=False)
class _Row:
    item: object  # the engine's Prepared request
    prompt: PromptKV | None
    ids: list[int]
    sampling: RowSampling
    stop: list[str]
    on_token: OnToken | None
    cancelled: Callable[[], bool] | None
    done: Done | None
    fed: int = 0  # input ids already in the slot
    n: int = 0  # tokens in the slot (input, then generated)
    pending: int | None = None  # a sampled token not yet in the slot
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    error: BaseException | None = None

    @property
    def reserve(self) -> int:
        return len(self.ids) + self.sampling.max_new_tokens


def generate_result(detok, item, tokens: list[int], reason: str, logprobs: list | None) -> GenerateResult:
    """A prepared request's result from its new tokens: their text after the prompt (``detok``: the engine's
    :class:`~softprompt.engine.detokenize.Detokenizer`) cut at its first stop string, and why it ended
    (``length`` only when it ran out of tokens without a stop string; else ``stop``)."""
    text = detok.text(tokens)
    cut = [text.index(s) for s in item.request.stop if s in text]
    if cut:
        text = text[:min(cut)]
    reason = "length" if reason == "length" and not cut else "stop"
    return GenerateResult(item.task.name, text, tokens, reason, len(item.rows[0].ids), item.source, logprobs)


class RunningBatch:
    """The rows being generated on one engine; see the module docstring.

    Args:
        engine: a causal-LM :class:`~softprompt.engine.Engine` (its model, tokenizer and prompts).
        max_rows: most rows running at once (default, and at most: the engine's ``max_batch_rows``, the most
            rows of one forward).
        max_tokens: most input + new tokens reserved by the running rows (default: the engine's
            ``max_batch_tokens``); a row that alone needs more still runs when the batch is empty.
        prefill_chunk: most input tokens read per step (default: the engine's ``prefill_chunk``).
    """

    def __init__(self, engine, max_rows: int | None = None, max_tokens: int | None = None,
                 prefill_chunk: int | None = None):
        self.engine = engine
        self.max_rows = min(max_rows or engine.max_batch_rows, engine.max_batch_rows)
        self.max_tokens = max_tokens or engine.max_batch_tokens
        self.prefill_chunk = max(1, prefill_chunk or engine.prefill_chunk)
        self.slots = SlotKV()
        self.rows: list[_Row] = []  # slot order: [0, decoding) decode, [decoding, len) still reading input
        self.decoding = 0
        self.steps = 0
        self.peak_bytes = 0
        self.switch = rope_switch(engine.model)  # None, or the length past which a forward's rope changes

    def __len__(self) -> int:
        return len(self.rows)

    def reserved(self) -> int:
        return sum(r.reserve for r in self.rows)

    def room(self, item) -> bool:
        """Whether prepared request ``item`` can join now."""
        if not self.rows:
            return True
        need = len(item.rows[0].ids) + item.request.max_tokens
        return len(self.rows) < self.max_rows and self.reserved() + need <= self.max_tokens

    def memory(self) -> dict:
        """Bytes held by the rows' key/value slots, and the tokens and rows they hold."""
        return {"bytes": self.slots.nbytes(), "rows": len(self.rows), "tokens": sum(r.n for r in self.rows)}

    # ------------------------------------------------------------------------------------ joining
    def admit(self, item, on_token: OnToken | None = None, cancelled: Callable[[], bool] | None = None,
              done: Done | None = None) -> None:
        """Add a prepared generate request; it starts reading its input at the next step.

        Raises:
            EngineError: its task changed and it no longer prepares, or its prompt is gone.
        """
        for _ in range(3):  # a reload between preparing and fetching the prompt: prepare against the new one
            (item,) = self.engine.refresh("generate", [item])
            prompt = self.engine.backend.prompt(item.rows[0].prompt)
            if self.engine.versions(item.task.members) == item.versions:
                break
        else:
            raise RequestError(f"task {item.task.name!r} was reloaded while the request joined, three times: retry")
        row = item.rows[0]
        req = item.request
        gen = None
        if req.temperature > 0:
            gen = torch.Generator(device=self.engine.model.device)
            gen.manual_seed(item.seed)
        sampling = RowSampling(req.max_tokens, float(req.temperature), req.top_k, float(req.top_p), gen, req.logprobs)
        self.rows.append(_Row(item, prompt, list(row.ids), sampling, list(req.stop), on_token, cancelled, done,
                              logprobs=[] if req.logprobs is not None else None))

    # ------------------------------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self) -> None:
        """One iteration: finish cancelled rows, one decode forward, one prefill chunk; finished rows leave."""
        self.steps += 1
        for r in [r for r in self.rows if r.cancelled is not None and r.cancelled()]:
            self._finish(r, "stop")
        if self.decoding:
            self._decode()
        if len(self.rows) > self.decoding:
            self._prefill()
        self.peak_bytes = max(self.peak_bytes, self.slots.nbytes())
        self.slots.shrink(len(self.rows), max((r.n for r in self.rows), default=0) + 1)

    def _decode(self) -> None:
        rows = self.rows[:self.decoding]
        hidden = self._sides(0, rows, [[r.pending] for r in rows])
        for r in rows:
            if r.error is None:
                r.n += 1
        self._emit([(r, h) for r, h in zip(rows, hidden, strict=True) if h is not None])

    def _prefill(self) -> None:
        budget, rows, chunks = self.prefill_chunk, [], []
        for r in self.rows[self.decoding:]:
            if budget <= 0:
                break
            at = r.n + (r.prompt.length if r.prompt is not None else 0)  # position of its next input token
            room = self.switch - at if self.switch is not None and at < self.switch else budget
            take = r.ids[r.fed:r.fed + min(budget, room)]  # a chunk ends at the rope switch, if it reaches it
            rows.append(r)
            chunks.append(take)
            budget -= len(take)
        hidden = self._sides(self.decoding, rows, chunks)
        ready = []
        for r, take, h in zip(rows, chunks, hidden, strict=True):
            if h is None:
                continue
            r.fed += len(take)
            r.n += len(take)
            if r.fed == len(r.ids):
                ready.append((r, h))
        self._emit(ready)
        for r, _ in ready:
            if r in self.rows:  # still running: it now decodes
                i = self.rows.index(r)
                self._swap(i, self.decoding)
                self.decoding += 1

    def _sides(self, a: int, rows: list[_Row], chunks: list[list[int]]) -> list[torch.Tensor | None]:
        """:meth:`_forward` over each run of neighbouring rows on one side of the rope switch (all at once
        without one): a row past it would change the rotary factors of the rows before it."""
        if self.switch is None:
            return self._forward(a, rows, chunks)
        past = [r.n + (r.prompt.length if r.prompt is not None else 0) + len(c) > self.switch
                for r, c in zip(rows, chunks, strict=True)]
        out, i = [], 0
        while i < len(rows):
            j = i + 1
            while j < len(rows) and past[j] == past[i]:
                j += 1
            out += self._forward(a + i, rows[i:j], chunks[i:j])
            i = j
        return out

    def _forward(self, a: int, rows: list[_Row], chunks: list[list[int]]) -> list[torch.Tensor | None]:
        """Hidden state after each row's chunk (None for a row whose forward failed: it fails alone)."""
        try:
            return list(self._run(a, rows, chunks))
        except Exception as e:  # noqa: BLE001 - whatever it is, it must not fail the other rows
            if len(rows) == 1:
                if not isinstance(e, EngineError):
                    log.error("generation failed: %s: %s", type(e).__name__, e, exc_info=e)
                rows[0].error = e
                return [None]
            half = len(rows) // 2
            return self._forward(a, rows[:half], chunks[:half]) + self._forward(a + half, rows[half:], chunks[half:])

    def _run(self, a: int, rows: list[_Row], chunks: list[list[int]]) -> torch.Tensor:
        model = self.engine.model
        width = max(len(c) for c in chunks)
        ids = torch.full((len(rows), width), self.engine.tok.pad_token_id or 0, dtype=torch.long)
        for i, c in enumerate(chunks):
            ids[i, :len(c)] = torch.tensor(c)
        return slot_forward(model, self.slots, a, ids.to(model.device), [len(c) for c in chunks],
                            [r.n for r in rows], [r.prompt for r in rows])

    def _emit(self, ready: list[tuple[_Row, torch.Tensor]]) -> None:
        """Pick each ready row's next token from its hidden state; finish rows that end."""
        for r in [r for r in self.rows if r.error is not None]:
            self._finish(r, "error")
        if not ready:
            return
        rows = [r for r, _ in ready]
        logits = logits_from_hidden(self.engine.model, torch.stack([h for _, h in ready]))  # (B, V)
        toks = logits.argmax(-1)
        for i, r in enumerate(rows):
            s = r.sampling
            if s.temperature > 0:
                try:
                    toks[i] = sample_next(logits[i:i + 1], s.temperature, s.top_k, s.top_p, s.generator)[0]
                except Exception as e:  # noqa: BLE001 - e.g. non-finite logits: the row fails alone
                    log.error("sampling failed: %s: %s", type(e).__name__, e, exc_info=e)
                    r.error = e
        failed = [r for r in rows if r.error is not None]
        for r in failed:
            self._finish(r, "error")
        if failed:
            keep = [i for i, r in enumerate(rows) if r.error is None]
            rows, logits, toks = [rows[i] for i in keep], logits[keep], toks[keep]
            if not rows:
                return
        want = [i for i, r in enumerate(rows) if r.logprobs is not None]
        lps = {}
        if want:
            sel = torch.tensor(want, device=logits.device)
            lps = dict(zip(want, token_logprobs(logits[sel], toks[sel], max(rows[i].sampling.logprobs for i in want)),
                           strict=True))
        for i, (r, t) in enumerate(zip(rows, toks.tolist(), strict=True)):
            if t in self.engine.row_end_ids(r.item):
                self._finish(r, "stop")
                continue
            r.tokens.append(t)
            if i in lps:
                got = lps[i]
                r.logprobs.append(TokenLogprob(got.token, got.logprob, got.top[:r.sampling.logprobs]))
            try:
                if r.on_token is not None:
                    r.on_token(list(r.tokens), None if r.logprobs is None else list(r.logprobs))
            except Exception as e:  # noqa: BLE001 - a failing stream fails its own row only
                r.error = e
                self._finish(r, "error")
                continue
            if r.stop and any(x in self.engine.detok.text(r.tokens) for x in r.stop):
                self._finish(r, "stop")
            elif len(r.tokens) >= r.sampling.max_new_tokens:
                self._finish(r, "length")
            else:
                r.pending = t

    def abort(self, error: BaseException) -> None:
        """Fail every row with ``error`` and empty the batch: what is left when a step raised where no single
        row can be blamed (the rows' state is unknown); the batch can take new rows afterwards."""
        rows, self.rows, self.decoding = list(self.rows), [], 0
        self.slots = SlotKV()  # the interrupted step's keys/values, and their memory, go with the rows
        for r in rows:
            if r.done is not None:
                try:
                    r.done(error)
                except Exception:  # noqa: BLE001 - one row's callback must not keep the others unanswered
                    log.exception("failing a generation raised")

    # ------------------------------------------------------------------------------------ leaving
    def _finish(self, r: _Row, reason: str) -> None:
        if r not in self.rows:
            return
        self._remove(self.rows.index(r))
        if r.done is None:
            return
        if reason == "error":
            r.done(r.error)
            return
        r.done(generate_result(self.engine.detok, r.item, list(r.tokens), reason, r.logprobs))

    def _move(self, src: int, dst: int) -> None:
        self.slots.move(src, dst, self.rows[src].n)
        self.rows[dst] = self.rows[src]

    def _swap(self, i: int, j: int) -> None:
        self.slots.swap(i, j, self.rows[i].n, self.rows[j].n)
        self.rows[i], self.rows[j] = self.rows[j], self.rows[i]

    def _remove(self, i: int) -> None:
        """Free slot ``i``, keeping the decoding and reading ranges contiguous (moves at most two rows)."""
        last = len(self.rows) - 1
        if i < self.decoding:
            end = self.decoding - 1
            self._move(end, i)
            self.decoding -= 1
            if last > end:
                self._move(last, end)
        else:
            self._move(last, i)
        self.rows.pop()
        self.slots.clear(last)  # the slot left free: a non-finite value there would reach the next row's output


def run_all(engine, items: list, on_token: Callable[[int, list[int], list | None], None] | None = None,
            cancelled: Callable[[int], bool] | None = None, progress: bool = False) -> list[GenerateResult]:
    """Generate for prepared requests through one running batch (rows join as others finish): per item its
    :class:`GenerateResult`, or the exception that failed it alone."""
    from tqdm.auto import tqdm

    batch = RunningBatch(engine)
    results: list = [None] * len(items)
    waiting = list(range(len(items)))
    bar = tqdm(total=len(items), desc="generate", unit="request", disable=None if progress else True)

    def done(i: int):
        def set_(res) -> None:
            results[i] = res
            bar.update(1)
        return set_

    while waiting or batch:
        while waiting and batch.room(items[waiting[0]]):
            i = waiting.pop(0)
            hook = (lambda toks, lps, i=i: on_token(i, toks, lps)) if on_token is not None else None
            stop = (lambda i=i: cancelled(i)) if cancelled is not None else None
            try:
                batch.admit(items[i], hook, stop, done(i))
            except EngineError as e:
                results[i] = e
        batch.step()
    bar.close()
    return results

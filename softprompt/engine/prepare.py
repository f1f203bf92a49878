"""Preparing one request for a batch: check its fields, render its template, tokenise, fit the context.

Preparation is per request and touches no tensors, so a server runs it outside the batch loop (a worker
thread, never the event loop or the scheduler): one huge or malformed request then fails or waits alone,
and the batch only runs requests that are already valid. :class:`Prepared` records the prompt versions
its rows were built for; a request whose task was reloaded in between is prepared again at run time.

A rendered source starts with the ids its prompt expects before the text (:meth:`Engine.lead_ids`: the
model's BOS after a soft prompt and with no prompt, as PEFT and pre-training lay them out; nothing after a
hard prompt, which starts with the BOS itself, for a prompt stored without it, or for a chat task, whose
conversation its chat template renders with its own special tokens). A text that already
starts with them (a chat template's ``<|begin_of_text|>``) keeps its own; a source cut from the left keeps
them, and they count in every length budget. Labels and continuations never get special tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from softprompt.data import TaskFormat, is_chat, with_leading
from softprompt.data.chat import lead_kept
from softprompt.engine.batching import Row
from softprompt.engine.requests import (
    ClassifyRequest,
    EngineError,
    GenerateRequest,
    RequestError,
    ScoreRequest,
    TooLongError,
    check_request,
)

KINDS = ("classify", "generate", "score")


@dataclass
class Prepared:
    """One request, checked and tokenised, ready to join a batch of its kind.

    Attributes:
        kind: ``classify``, ``generate`` or ``score``.
        request: the request as given.
        task: the engine's :class:`~softprompt.engine.engine.Task` it was prepared against.
        versions: ``(prompt key, version)`` of every member the rows were fitted to.
        rows: the rows to run (classify: one per member, or one per member and label for multi-token
            labels; score: one per member; generate: one).
        parts: classify: per member, its labels in the member's order and the indices of its rows in
            ``rows``.
        source: the rendered text of the first member (what a generation continues).
        continuation: score: the continuation's token ids.
        seed: generate: the request's sampling seed, or one drawn here for a sampled request without one,
            so a batch that is run again (a scheduler isolating a failure) samples the same text; None
            when greedy.
        asked: generate: the request as given, when ``request`` is a copy fitted to the prompt it was
            prepared against (its ``max_tokens`` ceiling lowered, a chat template's stop added); a reload
            prepares it again from this one.
    """

    kind: str
    request: object
    task: object
    versions: tuple
    rows: list[Row]
    parts: list = field(default_factory=list)
    source: str = ""
    continuation: list[int] | None = None
    seed: int | None = None
    asked: object = None  # generate: the request as given, when ``request`` is its fitted copy (re-prepared from)


def render(task, fmt: TaskFormat | None, req) -> str:
    """The text a request's input becomes under one member's template (raw text without one)."""
    if req.raw or fmt is None:
        if isinstance(req.input, dict):
            raise RequestError(f"task {task.name!r} has no template: send the whole text as a string")
        return req.input
    if is_chat(fmt):
        raise RequestError(f"task {task.name!r} is a chat task: send a conversation (/v1/chat/completions, "
                           "generate --messages) or raw text")
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


def encode(engine, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens; text the tokenizer cannot take is a request error."""
    try:
        return list(engine.tok(text, add_special_tokens=False)["input_ids"])
    except (TypeError, ValueError, UnicodeError) as e:
        raise RequestError(f"the text cannot be tokenised ({type(e).__name__}: {e})") from e


def lead_ids(engine, member, fmt: TaskFormat | None) -> list[int]:
    """The ids a text of a task in format ``fmt`` starts with after prompt ``member``: the prompt's
    (:meth:`Engine.lead_ids`), none for a chat task, whose text is a conversation its chat template rendered
    with its own special tokens, as chat prompts are trained (:func:`~softprompt.data.encode_chat`)."""
    return [] if fmt is not None and is_chat(fmt) else engine.lead_ids(member)


def kept_lead(engine, member, fmt: TaskFormat | None, ids: list[int]) -> int:
    """How many leading ``ids`` a cut keeps: the prompt's lead ids (:func:`lead_ids`), or for a chat task the
    BOS its chat template wrote, as training cuts a long conversation (:func:`~softprompt.data.chat.keep_end`)."""
    if fmt is not None and is_chat(fmt):
        return lead_kept(engine.tok, ids, engine.max_input_tokens)
    return len(lead_ids(engine, member, fmt))


def encode_source(engine, member, fmt: TaskFormat | None, text: str) -> list[int]:
    """Token ids of a rendered source as prompt ``member`` reads it: :func:`encode`, after the ids the
    prompt expects in front of the text (:func:`lead_ids`; none when the text already starts with them).

    Raises:
        RequestError: nothing at all to read (no text tokens and no BOS): the first token after the source
            (a label, a continuation) would have nothing before it to predict it from.
    """
    ids = with_leading(encode(engine, text), lead_ids(engine, member, fmt))
    if not ids:
        raise RequestError("the input has no tokens")
    return ids


def fit(engine, ids: list[int], keep_after: int, room: int, what: str, allow_truncate: bool,
        keep_before: int = 0, counted_after: int = 0, room_why: str = "") -> list[int]:
    """``ids`` (``keep_before`` tokens that must stay, e.g. the BOS, + source + ``keep_after`` tokens that
    must stay) within ``room`` tokens; a cut takes tokens from the start of the source.

    ``max_input_tokens`` bounds the source, ``keep_before`` included, and ``counted_after`` more tokens that
    come after it: what training's ``--max-length`` counts (the longest label after a classification source,
    the continuation after a scored one), so that an evaluation engine built with ``max_input_tokens`` =
    ``--max-length`` reads the text training read (it read ``counted_after`` more tokens of a long input).
    ``room_why`` says what else takes the context (named in the error when ``room`` is what is short)."""
    limit = min(room, engine.max_input_tokens + keep_after - counted_after)
    if len(ids) <= limit:
        return ids
    if not (allow_truncate and engine.truncate) or keep_before + keep_after >= limit:
        raise TooLongError(f"{what} has {len(ids)} tokens; at most {max(limit, 0)} fit "
                           f"(max_input_tokens {engine.max_input_tokens}, context {engine.context}"
                           f"{room_why if room < engine.max_input_tokens + keep_after - counted_after else ''})")
    return ids[:keep_before] + ids[len(ids) - (limit - keep_before):]


def prepare(engine, kind: str, req, index: int | None = None) -> Prepared:
    """Check, render and tokenise one request of ``kind`` against the engine's current tasks.

    Args:
        index: the request's position in a list, named in field errors.

    Raises:
        EngineError: the request is invalid, too long, or names an unknown task.
    """
    if kind not in KINDS:
        raise RequestError(f"unknown request kind {kind!r} (one of {', '.join(KINDS)})")
    expected = {"classify": ClassifyRequest, "generate": GenerateRequest, "score": ScoreRequest}[kind]
    if not isinstance(req, expected):
        raise RequestError(f"a {kind} request must be a {expected.__name__}, got {type(req).__name__}")
    problems = check_request(req, kind)
    if problems:
        raise RequestError(("" if index is None else f"request {index}: ") + "; ".join(problems))
    task = engine.task(req.task)
    versions = engine.versions(task.members)
    prepare_kind = {"classify": _prepare_classify, "score": _prepare_score, "generate": _prepare_generate}[kind]
    try:
        return prepare_kind(engine, req, task, versions)
    except EngineError as e:  # which of a list of inputs is too long or empty
        if index is None:
            raise
        raise type(e)(f"request {index}: {e}") from None


def _prepare_classify(engine, req: ClassifyRequest, task, versions) -> Prepared:
    if task.labels is None:
        raise RequestError(f"task {task.name!r} is not a classification task (no verbalizer)")
    rows: list[Row] = []
    parts = []
    for member, fmt in zip(task.members, task.formats, strict=True):
        start = len(rows)
        rows.extend(engine.backend.classify_rows(member, fmt, render(task, fmt, req), task))
        parts.append((fmt.labels, list(range(start, len(rows)))))
    return Prepared("classify", req, task, versions, rows, parts)


def _prepare_score(engine, req: ScoreRequest, task, versions) -> Prepared:
    engine.backend.require_language_model("scoring a continuation")
    cont = encode(engine, req.continuation)
    if not cont:
        raise RequestError(f"continuation {req.continuation!r} has no tokens")
    if req.eos:
        if engine.tok.eos_token_id is None:
            raise RequestError("eos: the tokenizer has no EOS token")
        cont = [*cont, int(engine.tok.eos_token_id)]
    rows = []
    for member, fmt in zip(task.members, task.formats, strict=True):
        room = engine.context - engine.backend.length(member)
        src = encode_source(engine, member, fmt, render(task, fmt, req))
        ids = fit(engine, src + cont, len(cont), room, f"score input for task {task.name!r}", True,
                  kept_lead(engine, member, fmt, src), len(cont))
        rows.append(Row(member, ids, len(ids) - len(cont)))
    return Prepared("score", req, task, versions, rows, continuation=cont)


def _prepare_generate(engine, req: GenerateRequest, task, versions) -> Prepared:
    engine.backend.require_language_model("generating text")
    asked = req
    if task.kind == "ensemble":
        raise RequestError(f"task {task.name!r} is an ensemble: ensembles classify and score; generate "
                           f"with one of its members ({', '.join(task.members)})")
    member = task.members[0]
    source = render(task, task.formats[0], req)
    lead = lead_ids(engine, member, task.formats[0])
    ids = with_leading(encode(engine, source), lead)
    if not ids:  # an empty text after the BOS is an answer from the start, as OpenAI takes prompt ""
        raise RequestError(f"task {task.name!r}: the input has no tokens (and the model puts no BOS before it)")
    # a chat template's end of turn written as text: from the format this request is prepared with (looking the
    # task up again by name could meet a task reloaded meanwhile)
    extra = [s for s in engine.turns.stops(task.formats[0], req.chat) if s not in req.stop]
    if extra:
        req = replace(req, stop=[*req.stop, *extra])
    if req.fit_max_tokens:  # a ceiling: what the context leaves after the prompt and the input (at least 1)
        left = engine.context - engine.backend.length(member) - len(ids)
        req = replace(req, max_tokens=max(1, min(req.max_tokens, left)), fit_max_tokens=False)
    room = engine.context - engine.backend.length(member) - req.max_tokens
    # an engine made to truncate (evaluation: inputs cut where training cut them) keeps the end of a long input
    why = f", of which the prompt's {engine.backend.length(member)} virtual tokens and max_tokens {req.max_tokens}"
    row = Row(member, fit(engine, ids, 0, room, f"generate input for task {task.name!r}", True,
                          kept_lead(engine, member, task.formats[0], ids),
                          room_why=why + " are taken: ask for fewer tokens or send a shorter input"), 0)
    seed = req.seed
    if req.temperature > 0 and seed is None:
        seed = int(torch.randint(0, 2**62, (1,)))
    return Prepared("generate", req, task, versions, [row], source=source, seed=seed,
                    asked=asked if req is not asked else None)

"""What the engine is asked and what it answers; errors map one-to-one to HTTP status codes in the server."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from softprompt.forward import TokenLogprob

MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top_logprobs


class EngineError(Exception):
    """Base class of engine errors (bad requests; the engine itself stays usable)."""


class UnknownTaskError(EngineError):
    """A request names a task the engine has not loaded (HTTP 404)."""


class RequestError(EngineError):
    """A request's fields are invalid (HTTP 422)."""


class TooLongError(EngineError):
    """A request has more tokens than the engine accepts (HTTP 400)."""


class ChatLayoutError(EngineError):
    """A chat conversation for a task whose prompt never learned a chat layout (HTTP 400; ``generate
    --messages``: exit 2): see :func:`~softprompt.engine.turns.require_chat_layout`."""


Input = str | dict[str, str]


@dataclass
class ClassifyRequest:
    """Pick a label of ``task``'s verbalizer for ``input``.

    Attributes:
        task: a loaded classification task (prompt or ensemble).
        input: the text for the template's one field, or a dict of field values.
        raw: use ``input`` (a string) as the whole text, without the template.
    """

    task: str
    input: Input
    raw: bool = False


@dataclass
class ClassifyResult:
    """The chosen label, each label's probability, and each label's log-likelihood.

    For an ensemble, ``probs`` is the mean of the members' probabilities, ``scores`` the log of the members'
    mean likelihood (``logsumexp - log M``, what ``score`` gives for the ensemble), and ``votes`` counts the
    members' picks.
    """

    task: str
    label: str
    probs: dict[str, float]
    scores: dict[str, float]
    votes: dict[str, int] | None = None


@dataclass
class GenerateRequest:
    """Continue ``input`` with ``task``'s prompt.

    Attributes:
        max_tokens: most new tokens.
        temperature: 0 is greedy; > 0 samples.
        top_k: keep the k most likely tokens (0: all).
        top_p: keep the smallest set of tokens whose probability reaches ``top_p``.
        seed: seeds this request's own sampler (same seed, same text, whatever else is in the batch).
        stop: strings that end the output (not included in it).
        logprobs: None for none; ``k`` (0 to 20) for each new token's log-probability under the model and
            the ``k`` most likely tokens at its place (:class:`~softprompt.forward.TokenLogprob`).
        fit_max_tokens: ``max_tokens`` is a ceiling, lowered to the room the context leaves after the prompt and
            the input (a chat reply with no ``max_tokens``: the rest of the context, as OpenAI's chat does);
            otherwise an input that leaves less room is refused.
        chat: the input is a conversation the tokenizer's own chat template rendered (a chat completion on a
            task without a chat format): that template's end of turn ends the answer, as it ends a chat task's.
    """

    task: str
    input: Input
    raw: bool = False
    max_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None
    fit_max_tokens: bool = False
    chat: bool = False


@dataclass
class GenerateResult:
    """The new text (cut at a stop string), its token ids, why it ended, and the text that was continued;
    with ``logprobs`` asked, one :class:`~softprompt.forward.TokenLogprob` per token of ``tokens``."""

    task: str
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" (a stop string or EOS) or "length"
    prompt_tokens: int
    source: str = ""
    logprobs: list[TokenLogprob] | None = None


@dataclass
class ScoreRequest:
    """Log-probability of ``continuation`` after ``input`` under ``task``'s prompt; with ``eos``, of the
    continuation followed by the tokenizer's EOS (the answer and its end, as generation tasks train)."""

    task: str
    input: Input
    continuation: str
    raw: bool = False
    eos: bool = False


@dataclass
class ScoreResult:
    """``logprob``: the continuation's log-probability (an ensemble's: of its members' mean probability);
    ``token_logprobs``: each token's given the ones before it (an ensemble's: under that mixture), summing to
    ``logprob``."""

    task: str
    logprob: float
    token_logprobs: list[float]
    tokens: list[int]


SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def unencodable(text: str) -> str | None:
    """Why ``text`` cannot be tokenised (a lone surrogate has no UTF-8 form), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"it holds {text[e.start:e.end]!r} at character {e.start}, which has no UTF-8 form"
    return None


def check_request(req, kind: str) -> list[str]:
    """Field problems of one request (all of them), for a :class:`RequestError`."""
    problems = []
    if not isinstance(req.task, str) or not req.task:
        problems.append("task must be a non-empty string")
    if not isinstance(req.raw, bool):  # "no" is truthy: the template was silently dropped
        problems.append(f"raw must be true or false, got {req.raw!r}")
    texts: list[tuple[str, str]] = []  # (what, text) to check for text the tokenizer cannot take
    if isinstance(req.input, dict):
        if req.raw is True:
            problems.append("raw input must be a string, not a dict of fields")
        bad = [k for k, v in req.input.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            problems.append(f"input fields must map names to strings (bad: {bad[:3]})")
        texts += [(f"input field {k!r}", v) for k, v in req.input.items() if isinstance(v, str)]
    elif not isinstance(req.input, str):
        problems.append(f"input must be a string or a dict of field values, got {type(req.input).__name__}")
    else:
        texts.append(("input", req.input))
    if kind == "generate":
        if not _is_int(req.max_tokens) or req.max_tokens < 1:
            problems.append(f"max_tokens must be an integer >= 1, got {req.max_tokens!r}")
        if not isinstance(req.fit_max_tokens, bool):
            problems.append(f"fit_max_tokens must be true or false, got {req.fit_max_tokens!r}")
        if not isinstance(req.chat, bool):
            problems.append(f"chat must be true or false, got {req.chat!r}")
        if not _is_real(req.temperature) or req.temperature < 0:
            problems.append(f"temperature must be a finite number >= 0, got {req.temperature!r}")
        if not _is_int(req.top_k) or req.top_k < 0:
            problems.append(f"top_k must be an integer >= 0, got {req.top_k!r}")
        if not _is_real(req.top_p) or not 0 < req.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {req.top_p!r}")
        if req.seed is not None and (not _is_int(req.seed) or not SEED_RANGE[0] <= req.seed <= SEED_RANGE[1]):
            problems.append(f"seed must be an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]}, got {req.seed!r}")
        if req.logprobs is not None and (not _is_int(req.logprobs) or not 0 <= req.logprobs <= MAX_TOP_LOGPROBS):
            problems.append(f"logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS} (the top tokens to list), "
                            f"got {req.logprobs!r}")
        if not isinstance(req.stop, list) or not all(isinstance(s, str) and s for s in req.stop):
            problems.append("stop must be a list of non-empty strings")
        else:
            texts += [("stop string", s) for s in req.stop]
    if kind == "score":
        if not isinstance(req.continuation, str) or not req.continuation:
            problems.append("continuation must be a non-empty string")
        else:
            texts.append(("continuation", req.continuation))
        if not isinstance(req.eos, bool):
            problems.append(f"eos must be true or false, got {req.eos!r}")
    for what, text in texts:
        why = unencodable(text)
        if why:
            problems.append(f"{what} cannot be tokenised: {why}")
    return problems

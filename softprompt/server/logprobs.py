"""OpenAI ``logprobs`` from the engine's per-token :class:`~softprompt.forward.TokenLogprob`: each token's
string, which tokens a (streamed) text carries, and the completions and chat formats.

Token strings. A token's string is the text it adds to the completion: the decoded text of the tokens
before it and the token, less the decoded text of those before it; the first token's are decoded after the
engine's plain lead token (:mod:`softprompt.engine.detokenize`), as the completion's text is. So the tokens'
strings join into the completion's text, whatever the tokenizer puts between tokens (a space for a
word-level one, none for byte-level BPE, SentencePiece's "▁"), and ``text_offset`` is where each token starts in
that text (characters, from 0: the prompt is not echoed). The tokens before it are taken back to the
``WINDOW``-th one that decodes to some text (all, near the start): decoding is local, but whether any text
comes before a token decides its leading space, and special or unknown tokens decode to nothing.

A byte-level BPE token can end inside a UTF-8 character; its bytes alone are no text (decoded, they are
U+FFFD). An unfinished character is never part of a string: a token that ends inside one adds only the
characters it finishes (possibly ``""``), and the token that finishes a character carries all of it. Strings
are therefore always whole characters, and a chat entry's ``bytes`` is the UTF-8 of its string (never
null): the entries' bytes join into the text's UTF-8. The bytes of a character split over several tokens
all go to the token that finishes it, not each token's own share as OpenAI gives them: the tokenizer's
decode returns text, not bytes, for any tokenizer (vLLM renders them the same way). A completion cut by
``max_tokens`` inside a character ends with U+FFFD in its text, which no token's string holds.

Alternatives (``top_logprobs``) are rendered in the chosen token's place, after the same tokens: the text
each would have added there. A special token (EOS, a chat template's markers) adds no text, as the
completion's text leaves them out: chosen, its string is ``""``; as an alternative it is shown by its name
(``<|endoftext|>``), so that a likely end is seen. In the completions format alternatives are a dict keyed
by their strings, so of two with the same string (two unfinished characters, both ``""``) the more likely
one is kept.

Which tokens: those whose text the response returns. When the text is cut at a stop string, the tokens
from the cut on have no entry; a token whose text the cut splits keeps its entry, with its whole string.
EOS has none (the engine leaves it out). A non-finite log-probability is sent as -9999.0 (JSON has no
-Infinity), as other OpenAI-compatible servers do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from softprompt.engine.detokenize import Detokenizer

WINDOW = 8  # tokens with text a token's string is decoded after (a character spans at most 4 bytes: tokens)
FLOOR = -9999.0
PARTIAL = "\ufffd"  # what decoding gives for the bytes of an unfinished character


@dataclass(frozen=True)
class Entry:
    """One generated token as a response shows it: its string, where it starts in the completion's text,
    its log-probability, and the most likely tokens there, (string, log-probability) ranked."""

    token: str
    offset: int
    logprob: float
    top: list[tuple[str, float]]


class Renderer:
    """A generation's tokens as :class:`Entry` items, a few at a time (streaming) or all at once.

    An entry depends only on the tokens up to it, so the entries a stream sends as tokens arrive are those
    of the finished response.
    """

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.detok = Detokenizer(tokenizer)  # the first token's context: its text after the prompt
        self.entries: list[Entry] = []
        self._special = set(getattr(tokenizer, "all_special_ids", None) or [])
        self._silent: dict[int, bool] = {}  # token id -> it decodes to no text alone
        self._end = 0  # length of the text the entries' strings cover

    def extend(self, tokens: list[int], logprobs: list) -> list[Entry]:
        """The entries of the tokens not rendered yet (``logprobs``: one TokenLogprob per token so far)."""
        start, stop = len(self.entries), min(len(tokens), len(logprobs))
        seqs, at = [], []
        for i in range(start, stop):
            a = self._context_start(tokens, i)
            context = (self.detok.lead if a == 0 else []) + list(tokens[a:i])
            at.append(len(seqs))
            seqs.append(context)
            seqs.extend(context + [t] for t in (tokens[i], *(alt for alt, _ in logprobs[i].top)))
        texts = self.tok.batch_decode(seqs, skip_special_tokens=True,  # no clean-up, as the completion's text
                                      clean_up_tokenization_spaces=False) if seqs else []
        new = []
        for i, a in zip(range(start, stop), at, strict=True):
            got, before = logprobs[i], texts[a].rstrip(PARTIAL)
            chosen, *alts = (_added(before, t) for t in texts[a + 1:a + 2 + len(got.top)])
            top = [(self._name(alt) if alt in self._special else s, _finite(v))
                   for s, (alt, v) in zip(alts, got.top, strict=True)]
            new.append(Entry(chosen, self._end, _finite(got.logprob), top))
            self._end += len(chosen)
        self.entries.extend(new)
        return new

    def _context_start(self, tokens: list[int], i: int) -> int:
        """Where token ``i``'s context starts: ``WINDOW`` tokens with text back, or the first token."""
        a, seen = i, 0
        while a > 0 and seen < WINDOW:
            a -= 1
            t = tokens[a]
            if t not in self._silent:
                self._silent[t] = self.tok.decode([t], skip_special_tokens=True) == ""
            seen += not self._silent[t]
        return a

    def _name(self, token: int) -> str:
        return str(self.tok.convert_ids_to_tokens(token))

    def final(self, result) -> list[Entry]:
        """The entries of a finished :class:`~softprompt.engine.GenerateResult`'s returned text."""
        self.extend(result.tokens, result.logprobs)
        return kept(self.entries, result.text, self.detok.text(result.tokens))


def entries_of(tokenizer, result) -> list[Entry] | None:
    """The entries of a generation result's returned text; None when it has no logprobs."""
    return None if result.logprobs is None else Renderer(tokenizer).final(result)


def kept(entries: list[Entry], text: str, full_text: str) -> list[Entry]:
    """All ``entries``, unless ``text`` was cut at a stop string (shorter than ``full_text``, the tokens'
    whole decoded text): then those of the tokens that start before the cut."""
    return entries if text == full_text else entries[:starting_before(entries, len(text))]


def starting_before(entries: list[Entry], end: int) -> int:
    """How many of ``entries`` (in order) start before character ``end`` of the text."""
    return sum(1 for e in entries if e.offset < end)


def completion_format(entries: list[Entry], top: bool) -> dict:
    """OpenAI completions' (legacy) ``logprobs``; ``top``: the request asked for top tokens (``logprobs`` > 0).
    As OpenAI's, each place's top tokens include the chosen one, so there may be k + 1 of them (a sampled token
    outside the k most likely was missing)."""
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [_top_dict([*e.top, (e.token, e.logprob)]) for e in entries] if top else None,
            "text_offset": [e.offset for e in entries]}


def chat_format(entries: list[Entry]) -> dict:
    """OpenAI chat's ``logprobs``."""
    return {"content": [{"token": e.token, "logprob": e.logprob, "bytes": _bytes(e.token),
                         "top_logprobs": [{"token": s, "logprob": v, "bytes": _bytes(s)} for s, v in e.top]}
                        for e in entries],
            "refusal": None}


def _added(before: str, after: str) -> str:
    """What ``after`` adds to ``before`` (both decoded texts), an unfinished last character left out."""
    after = after.rstrip(PARTIAL)
    if after.startswith(before):
        return after[len(before):]
    return after[len(os.path.commonprefix([before, after])):]  # a decoder that rewrites earlier text


def _finite(logprob: float) -> float:
    return logprob if logprob > FLOOR else FLOOR  # NaN too


def _top_dict(top: list[tuple[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for s, v in top:
        out.setdefault(s, v)  # ranked: the more likely of two with the same string
    return out


def _bytes(s: str) -> list[int]:
    return list(s.encode("utf-8"))

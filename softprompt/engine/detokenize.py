"""Generated token ids as the text they add after the prompt.

Decoding the generated ids alone is not that text for every tokenizer: a SentencePiece tokenizer (Llama 2,
Mistral: a ``Metaspace`` or ``Strip`` decoder) drops the leading space of the first token it decodes, so a
model that continued "The capital of France is" with "▁Paris" returned "Paris", and the prompt and the
completion no longer joined into the text the model wrote (a stop string starting with a space could not
match at the start either). The ids are decoded after one plain *lead* token and the lead's own text is
taken off: what the first generated token adds after some text, as it does after the prompt. For a
byte-level BPE (GPT-2, SmolLM2, Llama 3, Qwen) this is the same text as decoding the ids alone.

The text never goes through ``clean_up_tokenization_spaces``: that clean-up rewrites text already decoded
("x '" becomes "x's" once an "s" follows), so a stream that had sent "x '" could not match the final text;
without it, the text of the first k tokens is always a prefix of the text of the first k + 1 (once an
unfinished character's U+FFFD is left out), which streaming relies on.
"""

from __future__ import annotations

from collections.abc import Sequence

LEAD_TEXT = "a"  # a plain word every tokenizer encodes as ordinary tokens


class Detokenizer:
    """Text of generated ids (:meth:`text`), and the lead ids to put before any decoded span that starts at
    the first generated token (:attr:`lead`: empty when the tokenizer needs none or has no plain token)."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.lead: list[int] = []
        self._lead_text = ""
        try:
            ids = list(tokenizer(LEAD_TEXT, add_special_tokens=False)["input_ids"])[-1:]
        except Exception:  # noqa: BLE001 - a tokenizer that cannot encode a word: decode the ids alone
            return
        special = set(getattr(tokenizer, "all_special_ids", None) or [])
        if ids and ids[0] not in special:
            text = self._decode(ids)
            if text:
                self.lead, self._lead_text = ids, text

    def text(self, ids: Sequence[int]) -> str:
        """The text ``ids`` add after the prompt (special tokens left out)."""
        return self.after_lead(self._decode(self.lead + list(ids)), ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def after_lead(self, decoded: str, ids: Sequence[int]) -> str:
        """``decoded`` (the text of :attr:`lead` + ``ids``) without the lead's text; should the tokenizer
        merge the two (no such tokenizer is known), the ids decoded alone."""
        if decoded.startswith(self._lead_text):
            return decoded[len(self._lead_text):]
        return self._decode(list(ids))

"""Context distillation on a causal LM: the frozen model with a long hard context (the teacher) against the
model with a soft prompt (the student), compared by their next-token distributions over the same inputs.

Layouts, for an input ``x`` (text tokens, no special tokens) and the context's ids ``c`` (with the model's
leading BOS, if its tokenizer adds one):

* teacher: ``[c_0 .. c_{n-2}]`` as cached keys/values (computed once), then ``[c_{n-1}] + x``;
* student: the prompt (``P`` positions), then ``lead + x`` (``lead``: the BOS, as training lays text out).

The teacher's context ends with its last token in the input row so that the distribution *right after the
context* (before any input token: the first token of a reply) is compared too, against the student's
output at its BOS. Without a BOS the student has no position for that distribution (its prompt's last
position is inside the cached prompt), so it is left out and only the positions after each input token
are compared. Teacher and student see the same input tokens; the compared rows are aligned by slicing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from softprompt.data import leading_special_ids, with_leading
from softprompt.forward.causal import CausalPrompt, compute_prompt_kv, decode, final_hidden
from softprompt.forward.choose import family_of
from softprompt.forward.common import InjectionError, PromptKV, RowSampling
from softprompt.forward.head import logits_from_hidden


@dataclass
class ContextTeacher:
    """A hard context prepared once: its keys/values and what the student's rows need to be aligned with it.

    Attributes:
        kv: keys/values of the context's ids but the last (``None`` for a one-token context).
        last_id: the context's last id: the first token of every teacher row.
        lead: the ids the student's text starts with (the BOS, or none).
        num_tokens: the context's length in tokens, without the BOS (what a request saves, minus ``P``).
    """

    kv: PromptKV | None
    last_id: int
    lead: list[int]
    num_tokens: int


def context_ids(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """``(ids, lead)``: what the teacher reads of the context ``text`` (the model's leading special tokens, then
    the text's ids) and those leading ids; ``len(ids) - len(lead)`` is the context's length in tokens (a text
    that starts with the BOS, a chat template's, counts it once, in ``lead``, which a request with the distilled
    prompt still has: ``[P, BOS, text]``). Only the tokenizer: checked before the model loads."""
    lead = leading_special_ids(tokenizer)
    return with_leading(tokenizer(text, add_special_tokens=False)["input_ids"], lead), list(lead)


def context_teacher(model, tokenizer, text: str) -> ContextTeacher:
    """Tokenise ``text`` (after the model's BOS) and compute its keys/values once, without gradients.

    Raises:
        InjectionError: ``model`` is not a causal LM (no cached context), or the text has no tokens.
    """
    family = family_of(model)
    if not (family.caches_prompt and family.models_text):
        raise InjectionError(f"context distillation needs a decoder-only language model; {type(model).__name__} "
                             f"is {family.description}")
    ids, lead = context_ids(tokenizer, text)
    if len(ids) == len(lead):
        raise InjectionError("the context is empty after tokenisation")
    kv = None
    if len(ids) > 1:
        emb = model.get_input_embeddings()(torch.tensor(ids[:-1], device=model.device))  # (n-1, H)
        with torch.no_grad():
            kv = compute_prompt_kv(model, emb)
    return ContextTeacher(kv=kv, last_id=ids[-1], lead=lead, num_tokens=len(ids) - len(lead))


def _rows(teacher: ContextTeacher, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Teacher and student rows for right-padded inputs ``(B, T)``, and the slices to compare."""
    b = input_ids.shape[0]
    first = torch.full((b, 1), teacher.last_id, dtype=input_ids.dtype, device=input_ids.device)
    ones = torch.ones(b, 1, dtype=attention_mask.dtype, device=attention_mask.device)
    t_ids, t_mask = torch.cat([first, input_ids], 1), torch.cat([ones, attention_mask], 1)  # (B, 1+T)
    n = len(teacher.lead)
    lead = torch.tensor(teacher.lead, dtype=input_ids.dtype, device=input_ids.device)[None].expand(b, -1)
    s_ids = torch.cat([lead, input_ids], 1)  # (B, n+T)
    s_mask = torch.cat([ones.expand(b, n), attention_mask], 1)
    # compared: teacher positions 0..T (after the context, then after each input token) against the
    # student's BOS and input positions; without a BOS the first teacher position has no partner
    t_from, s_from = (0, n - 1) if n else (1, 0)
    return (t_ids, t_mask, t_from), (s_ids, s_mask, s_from)


def pair_logprobs(model, teacher: ContextTeacher, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  prompt: CausalPrompt, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student next-token log-probabilities at every compared position: two ``(N, V)`` fp32.

    The teacher runs without gradients; the student keeps them (its prompt may require grad). ``prompt``
    is the student's (a :class:`PromptKV`, ``(P, H)`` embeddings, or ``None``: the base model alone). The
    LM head runs only at the compared (real, unpadded) positions.
    """
    (t_ids, t_mask, t_from), (s_ids, s_mask, s_from) = _rows(teacher, input_ids, attention_mask)
    sel = t_mask[:, t_from:].bool()  # (B, L) real positions; the student's slice has the same mask
    with torch.no_grad():
        h_t = final_hidden(model, t_ids, t_mask, teacher.kv)[:, t_from:]  # (B, L, H)
        t_lp = torch.log_softmax(logits_from_hidden(model, h_t[sel]) / temperature, dim=-1)  # (N, V)
    h_s = final_hidden(model, s_ids, s_mask, prompt)[:, s_from:]  # (B, L, H)
    if h_s.shape[:2] != sel.shape:
        raise InjectionError(f"student positions {tuple(h_s.shape[:2])} differ from teacher's {tuple(sel.shape)}")
    s_lp = torch.log_softmax(logits_from_hidden(model, h_s[sel]) / temperature, dim=-1)  # (N, V)
    return t_lp, s_lp


def kl_per_position(t_lp: torch.Tensor, s_lp: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of each row of two ``(N, V)`` log-probability tensors: ``(N,)``."""
    return (t_lp.exp() * (t_lp - s_lp)).sum(-1)


def distill_loss(model, teacher: ContextTeacher, batch, prompt: CausalPrompt, temperature: float = 1.0) -> torch.Tensor:
    """Mean KL(teacher || student) over a batch's compared positions, times ``temperature**2`` (so that the
    gradient's scale does not shrink with the temperature, as in Hinton et al.'s distillation)."""
    t_lp, s_lp = pair_logprobs(model, teacher, batch.input_ids, batch.attention_mask, prompt, temperature)
    return kl_per_position(t_lp, s_lp).mean() * temperature ** 2


@torch.no_grad()
def greedy_pair(model, teacher: ContextTeacher, inputs: list[list[int]], prompt: PromptKV | None,
                max_new_tokens: int) -> tuple[list[list[int]], list[list[int]]]:
    """Greedy continuations of each input by the teacher and by the student (no EOS stop: exactly
    ``max_new_tokens`` each), decoded one row at a time (no padding to get in the way)."""
    out_t, out_s = [], []
    rows = [RowSampling(max_new_tokens=max_new_tokens)]
    for ids in inputs:
        t = torch.tensor([[teacher.last_id, *ids]], device=model.device)
        s = torch.tensor([[*teacher.lead, *ids]], device=model.device)
        if s.shape[1] == 0:
            raise InjectionError("an empty input without a BOS has nothing for the student to continue")
        out_t.append(decode(model, t, torch.ones_like(t), teacher.kv, rows, None).tokens[0])
        out_s.append(decode(model, s, torch.ones_like(s), prompt, rows, None).tokens[0])
    return out_t, out_s


@torch.no_grad()
def sample_after_context(model, teacher: ContextTeacher, n: int, length: int, seed: int) -> list[list[int]]:
    """``n`` continuations of the context sampled from the model (temperature 1, ``length`` tokens, no EOS
    stop), seeded: the same ``seed`` gives the same inputs."""
    gen = torch.Generator(device=model.device).manual_seed(seed)
    rows = [RowSampling(max_new_tokens=length, temperature=1.0, generator=gen)]
    t = torch.tensor([[teacher.last_id]], device=model.device)
    return [decode(model, t, torch.ones_like(t), teacher.kv, rows, None).tokens[0] for _ in range(n)]

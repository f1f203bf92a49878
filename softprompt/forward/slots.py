"""Per-row key/value slots for iteration-level (continuous) batching on a causal LM.

A running batch is a set of rows that join and leave at every decode step. Each row owns one *slot*: the
keys/values of its own text tokens, in preallocated per-layer buffers ``(rows, kv_heads, capacity,
head_dim)`` (:class:`SlotKV`). A forward writes only its new tokens' keys/values at each row's own length
(no copy of the cache per step); buffers grow by doubling and shrink when the batch does, so a step costs
no copy at all and a row's memory is its own tokens. A forward runs over a contiguous range of slots, so
the keys/values it attends to are a view, never a gather.

The prompts' keys/values are never copied per row: rows keep a reference to their prompt's
:class:`PromptKV` and :func:`slot_attention` scores each distinct prompt once against the queries of the
rows that use it, then takes one softmax over [prompt | text] per row. A row keeps the prompt it joined
with, so a prompt reloaded mid-generation changes only the requests that arrive after.

The attention is registered with transformers' attention interface and switched on only around our own
forwards (:func:`slot_forward`, under :data:`MODEL_LOCK`); it honours the ``scaling``, ``sliding_window``
and ``softcap`` a model's attention passes. :func:`check_slots` compares it with the reference path on the
loaded model once, so a family whose attention does something else is served by the batch-at-a-time path
instead of silently giving other results.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache

from softprompt.forward.common import InjectionError, PromptKV, base_forward

ATTENTION = "softprompt_slots"
_STEP: contextvars.ContextVar[SlotStep | None] = contextvars.ContextVar("softprompt_slot_step", default=None)
#: Held while a slot forward has switched a model's attention implementation. A forward of the same model
#: from another thread must hold it too (the engine's prompt loads do), or it would run slot attention.
MODEL_LOCK = threading.RLock()


class SlotKV:
    """Text keys/values of every running row, one slot per row, in growable per-layer buffers."""

    def __init__(self):
        self.k: list[torch.Tensor | None] = []
        self.v: list[torch.Tensor | None] = []

    def _buffers(self, layer: int, like: torch.Tensor, rows: int, tokens: int):
        while len(self.k) <= layer:
            self.k.append(None)
            self.v.append(None)
        k, v = self.k[layer], self.v[layer]
        if k is None or k.shape[0] < rows or k.shape[2] < tokens:
            r = max(rows, 2 * k.shape[0] if k is not None and k.shape[0] < rows else (k.shape[0] if k is not None
                                                                                       else 0))
            t = max(tokens, 2 * k.shape[2] if k is not None and k.shape[2] < tokens else (k.shape[2] if k is not None
                                                                                        else 0))
            t = -(-t // 64) * 64
            nk = like.new_zeros(r, like.shape[1], t, like.shape[3])
            nv = like.new_zeros(r, like.shape[1], t, like.shape[3])
            if k is not None:
                nk[:k.shape[0], :, :k.shape[2]] = k
                nv[:v.shape[0], :, :v.shape[2]] = v
            self.k[layer], self.v[layer] = nk, nv
        return self.k[layer], self.v[layer]

    def write(self, layer: int, a: int, starts: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
        """Write ``(B, kvh, Q, d)`` new keys/values of slots ``a..a+B`` at each row's ``starts``; return the
        slots' keys/values up to the longest row's end (views)."""
        b, _, q, _ = keys.shape
        end = int(starts.max()) + q
        k, v = self._buffers(layer, keys, a + b, end)
        kv, vv = k[a:a + b], v[a:a + b]
        rows = torch.arange(b, device=keys.device)[:, None]  # (B, 1)
        cols = starts.to(keys.device)[:, None] + torch.arange(q, device=keys.device)[None]  # (B, Q)
        kv[rows, :, cols] = keys.transpose(1, 2).to(kv.dtype)
        vv[rows, :, cols] = values.transpose(1, 2).to(vv.dtype)
        return kv[:, :, :end], vv[:, :, :end]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot ``src``'s first ``length`` keys/values into slot ``dst`` (a row changing place) and zero the
        rest of ``dst``. Columns past a row's length are masked out, but a masked NaN left by a row that went
        non-finite still poisons ``probs @ values`` (0 x NaN): every column past a row's length is kept zero
        (:meth:`clear` frees a slot)."""
        if src == dst:
            return
        for k, v in zip(self.k, self.v, strict=True):
            if k is not None:
                if length > 0:
                    k[dst, :, :length] = k[src, :, :length]
                    v[dst, :, :length] = v[src, :, :length]
                k[dst, :, max(length, 0):] = 0
                v[dst, :, max(length, 0):] = 0

    def clear(self, slot: int) -> None:
        """Zero slot ``slot`` (a row left it; see :meth:`move`)."""
        for k, v in zip(self.k, self.v, strict=True):
            if k is not None and slot < k.shape[0]:
                k[slot] = 0
                v[slot] = 0

    def swap(self, i: int, j: int, len_i: int, len_j: int) -> None:
        if i == j:
            return
        n = max(len_i, len_j)
        for k, v in zip(self.k, self.v, strict=True):
            if k is not None and n:
                k[[i, j], :, :n] = k[[j, i], :, :n]
                v[[i, j], :, :n] = v[[j, i], :, :n]

    def shrink(self, rows: int, tokens: int) -> None:
        """Give memory back when the batch needs a quarter of it or less (keeps the first ``rows`` slots)."""
        for layer, (k, v) in enumerate(zip(self.k, self.v, strict=True)):
            if k is None:
                continue
            if rows == 0:
                self.k[layer] = self.v[layer] = None
                continue
            t = -(-max(tokens, 1) // 64) * 64
            if rows * 4 <= k.shape[0] or t * 4 <= k.shape[2]:
                r, t = min(k.shape[0], max(rows, 1)), min(k.shape[2], t)
                self.k[layer] = k[:r, :, :t].clone()
                self.v[layer] = v[:r, :, :t].clone()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)


@dataclass
class SlotStep:
    """One forward over slots ``a .. a+B``: each row's prompt (shared keys/values, or None), its prompt
    length, its text length before the step (where its new tokens go) and its real new tokens."""

    slots: SlotKV
    a: int
    prompts: list[PromptKV | None]
    prompt_lens: torch.Tensor  # (B,)
    starts: torch.Tensor  # (B,)
    counts: torch.Tensor  # (B,) real new tokens (the rest of the Q columns are padding)
    _groups: list | None = None
    _masks: dict | None = None

    def groups(self) -> list[tuple[PromptKV, torch.Tensor]]:
        """Distinct prompts of the step and the rows that use each (computed once per step)."""
        if self._groups is None:
            by: dict[int, tuple[PromptKV, list[int]]] = {}
            for r, p in enumerate(self.prompts):
                if p is not None and p.length:
                    by.setdefault(id(p), (p, []))[1].append(r)
            dev = self.starts.device
            self._groups = [(p, torch.tensor(rows, device=dev)) for p, rows in by.values()]
        return self._groups

    def allowed(self, q: int, p_max: int, t: int, window, device) -> torch.Tensor:
        """The step's attention mask for one window size (computed once per step and window)."""
        if self._masks is None:
            self._masks = {}
        key = (q, p_max, t, window)
        if key not in self._masks:
            self._masks[key] = _allowed(self, q, p_max, t, window, device)
        return self._masks[key]


class SlotCache(Cache):
    """The cache argument of a slot forward: writes new keys/values into the step's slots."""

    def __init__(self, step: SlotStep):
        super().__init__(layers=[])
        self.step = step

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        s = self.step
        return s.slots.write(layer_idx, s.a, s.starts, key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                   softcap=None, **kwargs):
    """Attention of a slot forward: each row over its prompt's shared keys/values and its own text slot."""
    step = _STEP.get()
    if step is None:
        raise InjectionError("slot attention called outside a slot forward")
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise InjectionError("attention sinks are not supported by slot attention")
    b, h, q, d = query.shape
    kvh, t = key.shape[1], key.shape[2]
    g = h // kvh
    scale = scaling if scaling is not None else d ** -0.5
    qg = query.reshape(b, kvh, g * q, d)
    groups = step.groups()
    layer = module.layer_idx
    p_max = int(step.prompt_lens.max()) if groups else 0
    s_text = torch.matmul(qg, key.transpose(-1, -2).to(qg.dtype))  # (B, kvh, gQ, T)
    s_prompt = s_text.new_full((b, kvh, g * q, p_max), float("-inf"))
    for p, rows in groups:
        kp = p.layers[layer][0]  # (1, kvh, P, d); a sliding layer's cache may keep only its window's last slots
        cols = slice(p.length - kp.shape[2], p.length)
        s_prompt[rows, :, :, cols] = torch.matmul(qg[rows], kp.transpose(-1, -2).to(qg.dtype))
    s = torch.cat([s_prompt, s_text], dim=-1).float() * scale  # (B, kvh, gQ, P + T)
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    s = s.view(b, kvh, g, q, p_max + t).masked_fill(~step.allowed(q, p_max, t, sliding_window, s.device)[:, None, None],
                                                     float("-inf"))
    probs = torch.softmax(s, dim=-1).view(b, kvh, g * q, p_max + t).to(value.dtype)
    out = torch.matmul(probs[..., p_max:], value)  # (B, kvh, gQ, d)
    for p, rows in groups:
        vp = p.layers[layer][1]
        out[rows] += torch.matmul(probs[rows, :, :, p.length - vp.shape[2]:p.length], vp.to(value.dtype))
    return out.view(b, h, q, d).transpose(1, 2).contiguous(), None


def _allowed(step: SlotStep, q: int, p_max: int, t: int, window, device) -> torch.Tensor:
    """``(B, Q, P_max + T)``: which prompt slots and text columns each query may attend to."""
    plen = step.prompt_lens.to(device)[:, None, None]  # (B, 1, 1)
    qi = step.starts.to(device)[:, None, None] + torch.arange(q, device=device)[None, :, None]  # text index
    pc = torch.arange(p_max, device=device)[None, None]
    tc = torch.arange(t, device=device)[None, None]
    prompt_ok = pc < plen
    text_ok = tc <= qi
    if window:
        q_abs = plen + qi
        prompt_ok = prompt_ok & (q_abs - pc < window)
        text_ok = text_ok & (q_abs - (plen + tc) < window)
    return torch.cat([prompt_ok.expand(-1, q, -1), text_ok.expand(step.starts.shape[0], -1, -1)], dim=-1)


AttentionInterface.register(ATTENTION, slot_attention)


@contextlib.contextmanager
def _switched(model):
    configs = {id(c): c for c in [model.config, *(getattr(m, "config", None) for m in model.modules())]
               if c is not None and hasattr(c, "_attn_implementation")}
    with MODEL_LOCK:
        saved = {i: c._attn_implementation for i, c in configs.items()}
        try:
            for c in configs.values():
                c._attn_implementation = ATTENTION
            yield
        finally:
            for i, c in configs.items():
                c._attn_implementation = saved[i]


@torch.no_grad()
def slot_forward(model, slots: SlotKV, a: int, input_ids: torch.Tensor, counts: list[int], starts: list[int],
                 prompts: list[PromptKV | None]) -> torch.Tensor:
    """Run ``(B, Q)`` right-padded new tokens of slots ``a..a+B`` and return each row's last real hidden
    state ``(B, H)``; their keys/values are written at each row's ``starts`` (its text length so far)."""
    dev = input_ids.device
    b, q = input_ids.shape
    plens = torch.tensor([p.length if p is not None else 0 for p in prompts], device=dev)
    st = torch.tensor(starts, device=dev)
    n = torch.tensor(counts, device=dev)
    step = SlotStep(slots, a, prompts, plens, st, n)
    # a padding column takes its row's last real position (as the batch path's text_position_ids gives it):
    # counted on, it could pass the model's last position (learned position embeddings index out of range)
    cols = torch.minimum(torch.arange(q, device=dev)[None], (n - 1).clamp(min=0)[:, None])
    pos = plens[:, None] + st[:, None] + cols  # (B, Q)
    token = _STEP.set(step)
    try:
        with _switched(model):
            out = base_forward(model, input_ids=input_ids, position_ids=pos, cache=SlotCache(step), use_cache=True)
    finally:
        _STEP.reset(token)
    return out.last_hidden_state[torch.arange(b, device=dev), n - 1]  # (B, H)


def check_slots(model) -> str | None:
    """Compare slot forwards with the reference path on ``model``: None when they agree, else why not.

    Two rows with different prompts (one none) and different text lengths are prefilled in one forward and
    decoded one token; their hidden states must match :func:`~softprompt.forward.causal.final_hidden`.
    """
    from softprompt.forward.causal import compute_prompt_kv, final_hidden  # causal builds on this module

    try:
        with torch.no_grad():
            emb = model.get_input_embeddings()
            dev = emb.weight.device
            vocab = emb.weight.shape[0]
            gen = torch.Generator().manual_seed(0)
            ids = torch.randint(3, max(vocab, 4), (2, 6), generator=gen).to(dev)
            prompt = compute_prompt_kv(model, emb(torch.randint(3, max(vocab, 4), (3,), generator=gen).to(dev)))
            prompts = [prompt, None]
            slots = SlotKV()
            pad = ids.clone()
            pad[1, 4] = 0  # row 1 has 4 real tokens, then one more after the step
            h1 = slot_forward(model, slots, 0, pad[:, :5], [5, 4], [0, 0], prompts)
            h2 = slot_forward(model, slots, 0, torch.stack([ids[0, 5:6], ids[1, 4:5]]), [1, 1], [5, 4], prompts)
            for r, (p, n) in enumerate([(prompt, 6), (None, 5)]):
                mask = torch.ones(1, n, dtype=torch.long, device=dev)
                ref = final_hidden(model, ids[r:r + 1, :n], mask, p)[0]
                for got, at in ((h1[r], n - 2), (h2[r], n - 1)):
                    err = float((got - ref[at]).abs().max()) / (float(ref[at].abs().max()) + 1e-6)
                    if not err < (2e-3 if model.dtype == torch.float32 else 5e-2):
                        return f"slot attention differs from the model's own by {err:.2g} (relative)"
    except Exception as e:  # noqa: BLE001 - any failure means: do not use slots on this model
        return f"{type(e).__name__}: {e}"
    return None

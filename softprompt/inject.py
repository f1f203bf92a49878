"""The ONLY code that touches the Hugging Face forward pass.

A soft prompt occupies the first ``P`` positions of every row. In a causal LM those positions attend only
to each other, so their keys/values are identical for every row of a batch and for every request: we run
the prompt through the model once (batch 1), keep the per-layer keys/values (:class:`PromptKV`) and let
the text tokens attend to them through the model's public cache argument (``cache`` from transformers
5.24, ``past_key_values`` before; :func:`_base_forward` picks the one the installed version takes). In
training the keys/values carry gradients back to the prompt; expanding them over the batch is a view, and
autograd sums the rows' gradients. This gives the same result as prepending the prompt to ``inputs_embeds``
of every row (tests check logits and gradients) while computing the prompt once instead of ``B`` times.

A mixed-task batch (:class:`RowPrompts`) puts each row's prompt keys/values left-padded into one prefix;
the padding slots are masked out and each row's text positions start after its own prompt, so every row
gets exactly what it would get alone.

That saving is compute. On a GPU with small batches a training step is bound by kernel launches instead,
and the extra prompt pass costs as much as the text pass; there :func:`prompt_for_step` picks the
``concat`` pass, which prepends the prompt embeddings to every row and runs one forward.

Text positions continue after the prompt (``P + index among the row's real tokens``), so left and right
padding give identical results. The training loss applies the LM head only at target positions instead of
materialising a ``(B, T, vocab)`` logits tensor.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from softprompt.methods.base import PromptOutput
from softprompt.methods.head import is_sequence_classifier


class InjectionError(RuntimeError):
    """A shape or model mismatch when injecting a prompt."""


_CACHE_KWARG: dict[type, str] = {}


def _base_forward(model, cache=None, **kwargs):
    """Call the decoder stack (``model.base_model``) passing ``cache`` under the name this version uses.

    transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns and goes in 5.40).
    """
    base = model.base_model
    kind = type(base)
    if kind not in _CACHE_KWARG:
        params = inspect.signature(base.forward).parameters
        _CACHE_KWARG[kind] = "cache" if "cache" in params else "past_key_values"
    return base(**{_CACHE_KWARG[kind]: cache}, **kwargs)


def _out_cache(out):
    """The cache a forward returned, under either field name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _check_prompt(model, embeds: torch.Tensor) -> None:
    hidden = model.get_input_embeddings().weight.shape[1]
    if embeds.ndim != 2 or embeds.shape[1] != hidden:
        raise InjectionError(f"prompt embeddings have shape {tuple(embeds.shape)}, expected (P, {hidden}) "
                             f"for {type(model).__name__} (hidden size {hidden})")


@dataclass
class PromptKV:
    """Per-layer keys/values of a prompt computed with batch size 1.

    Attributes:
        layers: ``[(k, v), ...]`` one pair per layer, each ``(1, kv_heads, P, head_dim)``.
        length: ``P``.
    """

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    length: int

    def expand(self, model, batch_size: int) -> DynamicCache:
        """A fresh cache holding the prompt for ``batch_size`` rows (views, no copy).

        A new cache is built for each forward because the model appends the text's keys/values to it.
        """
        cache = DynamicCache(config=model.config)
        for i, (k, v) in enumerate(self.layers):
            cache.update(k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1), i)
        return cache


def compute_prompt_kv(model, prompt: PromptOutput | torch.Tensor) -> PromptKV | None:
    """Run the prompt through the frozen model once and keep its keys/values.

    Gradients flow through the result when the prompt requires grad (training); call under
    ``torch.no_grad()`` for inference.
    """
    if is_sequence_classifier(model):  # bidirectional encoder: nothing to cache, the prompt goes in as is
        return _classifier_prompt(model, prompt)
    if isinstance(prompt, PromptOutput) and prompt.kv is None and prompt.embeds is None:
        return None  # a method without a prompt (weight tuning in the comparison harness)
    if isinstance(prompt, PromptOutput) and prompt.kv is not None:  # prefix methods: keys/values directly
        layers = [(k.to(device=model.device, dtype=model.dtype), v.to(device=model.device, dtype=model.dtype))
                  for k, v in prompt.kv]
        if len(layers) != model.config.num_hidden_layers or any(k.ndim != 4 or k.shape[0] != 1 for k, _ in layers):
            raise InjectionError(f"prefix has {len(layers)} layers of shape {tuple(layers[0][0].shape)}; expected "
                                 f"{model.config.num_hidden_layers} of (1, kv_heads, P, head_dim)")
        return PromptKV(layers=layers, length=prompt.length)
    embeds = prompt.embeds if isinstance(prompt, PromptOutput) else prompt
    _check_prompt(model, embeds)
    if is_seq2seq(model):  # a bidirectional encoder: the prompt's states depend on the text, nothing to cache
        return embeds
    embeds = embeds.to(device=model.device, dtype=model.dtype)[None]  # (1, P, H)
    p = embeds.shape[1]
    out = _base_forward(model, inputs_embeds=embeds, position_ids=torch.arange(p, device=model.device)[None],
                        use_cache=True)
    cache = _out_cache(out)
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    if len(layers) != model.config.num_hidden_layers:
        raise InjectionError(f"prompt cache has {len(layers)} layers, model config says "
                             f"{model.config.num_hidden_layers}")
    return PromptKV(layers=layers, length=p)


@dataclass
class RowPrompts:
    """A different prompt per row (mixed-task batch), as one left-padded key/value prefix.

    Attributes:
        layers: ``[(k, v), ...]`` per layer, each ``(B, kv_heads, L, head_dim)``; row ``i``'s prompt fills
            its last ``lengths[i]`` slots, the slots before are zeros and masked out.
        prefix_mask: ``(B, L)``, 1 where row ``i`` has a prompt token.
        lengths: ``(B,)`` each row's prompt length; its text positions start there.
    """

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    prefix_mask: torch.Tensor
    lengths: torch.Tensor


def is_seq2seq(model) -> bool:
    """An encoder-decoder (T5 family): the prompt goes in front of the encoder input, as in the paper."""
    return bool(getattr(model.config, "is_encoder_decoder", False))


def _seq2seq_parts(model, batch, embeds: torch.Tensor):
    """Encoder ``inputs_embeds`` (prompt + source) and mask, decoder labels, from a source+target batch."""
    b = batch.input_ids.shape[0]
    src_mask = batch.attention_mask.bool() & ~batch.target_mask  # (B, T)
    sources = [batch.input_ids[i][src_mask[i]] for i in range(b)]
    targets = [batch.input_ids[i][batch.target_mask[i]] for i in range(b)]
    s_len, t_len = max(len(x) for x in sources), max(len(x) for x in targets)
    dev = batch.input_ids.device
    enc_ids = torch.zeros(b, s_len, dtype=torch.long, device=dev)
    enc_mask = torch.zeros(b, s_len, dtype=torch.long, device=dev)
    labels = torch.full((b, t_len), -100, dtype=torch.long, device=dev)
    for i in range(b):
        enc_ids[i, :len(sources[i])], enc_mask[i, :len(sources[i])] = sources[i], 1
        labels[i, :len(targets[i])] = targets[i]
    text = model.get_input_embeddings()(enc_ids)  # (B, S, H)
    p = 0 if embeds is None else embeds.shape[0]
    if p:
        text = torch.cat([embeds.to(text)[None].expand(b, -1, -1), text], dim=1)  # (B, P+S, H)
        enc_mask = torch.cat([torch.ones(b, p, dtype=torch.long, device=dev), enc_mask], dim=1)
    return text, enc_mask, labels


def _seq2seq_token_logprobs(model, batch, embeds):
    """Log-probability of every target token ``(B, L)`` (0 at padding) and the mask of real targets."""
    inputs, mask, labels = _seq2seq_parts(model, batch, embeds)
    logits = model(inputs_embeds=inputs, attention_mask=mask, labels=labels).logits.float()  # (B, L, V)
    real = labels != -100
    lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]  # (B, L)
    return lp * real, real


PROMPT_PASSES = ("auto", "shared_kv", "concat")


def prompt_for_step(model, prompt: PromptOutput | torch.Tensor, mode: str = "auto") -> PromptKV | torch.Tensor:
    """The prompt as the forward functions take it for one training step.

    ``shared_kv`` computes the prompt's keys/values once (batch 1) and shares them over the rows: less
    compute, one more (small) forward. ``concat`` returns the ``(P, H)`` embeddings, which
    :func:`final_hidden` prepends to every row in a single forward. ``auto`` takes ``concat`` on CUDA
    (launch-bound at prompt-tuning batch sizes) and ``shared_kv`` elsewhere (compute-bound).
    """
    if mode not in PROMPT_PASSES:
        raise InjectionError(f"prompt pass {mode!r} is not one of {', '.join(PROMPT_PASSES)}")
    if is_sequence_classifier(model):
        return _classifier_prompt(model, prompt)
    if isinstance(prompt, PromptOutput) and prompt.embeds is None:
        return compute_prompt_kv(model, prompt)  # a prefix (or no prompt): nothing to concatenate
    if is_seq2seq(model):
        mode = "concat"
    if mode == "auto":
        mode = "concat" if model.device.type == "cuda" else "shared_kv"
    if mode == "concat":
        embeds = prompt.embeds if isinstance(prompt, PromptOutput) else prompt
        _check_prompt(model, embeds)
        return embeds
    return compute_prompt_kv(model, prompt)


def text_position_ids(attention_mask: torch.Tensor, offset: int | torch.Tensor) -> torch.Tensor:
    """Positions of text tokens after ``offset`` prompt tokens (an int, or ``(B, 1)`` per row), skipping
    padding: ``(B, T)``."""
    pos = attention_mask.long().cumsum(-1) - 1 + offset  # (B, T)
    return pos.clamp(min=offset) if isinstance(offset, int) else torch.maximum(pos, offset)


def _prefix(model, prompt, b: int, like: torch.Tensor):
    """Cache, ``(B, L)`` prefix mask and text position offset for a prompt of any kind (or none)."""
    if prompt is None:
        return None, None, 0
    if isinstance(prompt, PromptKV):
        return prompt.expand(model, b), torch.ones(b, prompt.length, dtype=like.dtype, device=like.device), \
            prompt.length
    if prompt.prefix_mask.shape[0] != b:
        raise InjectionError(f"row prompts are for {prompt.prefix_mask.shape[0]} rows, the batch has {b}")
    cache = DynamicCache(config=model.config)
    for i, (k, v) in enumerate(prompt.layers):
        cache.update(k, v, i)
    return cache, prompt.prefix_mask.to(like.dtype), prompt.lengths[:, None]


def final_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 prompt_kv: PromptKV | RowPrompts | torch.Tensor | None = None) -> torch.Tensor:
    """Last-layer hidden states of the text tokens, with the prompt (if any) in front: ``(B, T, H)``.

    ``prompt_kv`` is a :class:`PromptKV` (one prompt's keys/values shared by all rows), a
    :class:`RowPrompts` (one prompt per row, from :meth:`PromptTable.rows`) or a ``(P, H)`` embedding
    tensor, which is prepended to every row's input embeddings (one forward; see :func:`prompt_for_step`).
    """
    if input_ids.shape != attention_mask.shape:
        raise InjectionError(f"input_ids {tuple(input_ids.shape)} and attention_mask "
                             f"{tuple(attention_mask.shape)} differ")
    b = input_ids.shape[0]
    if isinstance(prompt_kv, torch.Tensor):
        return _concat_hidden(model, input_ids, attention_mask, prompt_kv)
    cache, prefix_mask, offset = _prefix(model, prompt_kv, b, attention_mask)
    mask = attention_mask if prefix_mask is None else torch.cat([prefix_mask, attention_mask], dim=1)  # (B, L+T)
    out = _base_forward(model, input_ids=input_ids, attention_mask=mask, cache=cache,
                        position_ids=text_position_ids(attention_mask, offset), use_cache=False)
    return out.last_hidden_state  # (B, T, H)


def _concat_hidden(model, input_ids, attention_mask, embeds: torch.Tensor) -> torch.Tensor:
    """The prompt prepended to every row's ``inputs_embeds``; positions as in the shared-KV pass."""
    b, p = input_ids.shape[0], embeds.shape[0]
    text = model.get_input_embeddings()(input_ids)  # (B, T, H)
    prompt = embeds.to(device=text.device, dtype=text.dtype)[None].expand(b, -1, -1)  # (B, P, H)
    ones = torch.ones(b, p, dtype=attention_mask.dtype, device=attention_mask.device)
    pos = torch.cat([torch.arange(p, device=input_ids.device)[None].expand(b, -1),
                     text_position_ids(attention_mask, p)], dim=1)  # (B, P+T)
    out = _base_forward(model, inputs_embeds=torch.cat([prompt, text], dim=1),
                        attention_mask=torch.cat([ones, attention_mask], dim=1), position_ids=pos, use_cache=False)
    return out.last_hidden_state[:, p:]  # (B, T, H)


def logits_from_hidden(model, hidden: torch.Tensor) -> torch.Tensor:
    """Apply the LM head (and the model's logit scaling/soft-capping, if any), in fp32."""
    logits = model.get_output_embeddings()(hidden).float()
    cfg = model.config
    scale = getattr(cfg, "logit_scale", None)
    if isinstance(scale, int | float):
        logits = logits * scale
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _target_hidden(model, batch, prompt_kv: PromptKV | RowPrompts | torch.Tensor | None):
    """Hidden states that predict each target token, the target ids, and each one's row index."""
    if batch.target_mask[:, 0].any():
        raise InjectionError("a target token sits at position 0: every example needs a non-empty source")
    h = final_hidden(model, batch.input_ids, batch.attention_mask, prompt_kv)  # (B, T, H)
    sel = batch.target_mask[:, 1:]  # token t is predicted from position t-1
    rows = torch.nonzero(sel, as_tuple=True)[0]  # (N,)
    return h[:, :-1][sel], batch.input_ids[:, 1:][sel], rows  # (N, H), (N,), (N,)


def _classifier_prompt(model, prompt) -> PromptOutput:
    """A sequence classifier's prompt: embeddings (or none) and its head, checked against the model."""
    if isinstance(prompt, torch.Tensor):
        prompt = PromptOutput(embeds=prompt)
    if prompt is None:
        return PromptOutput()
    if prompt.kv is not None:
        raise InjectionError(f"{type(model).__name__} is an encoder sequence classifier: a key/value prefix "
                             "needs a decoder's cache; use a prompt of embeddings (prompt_tuning, p_tuning)")
    if prompt.embeds is not None:
        _check_prompt(model, prompt.embeds)
    return prompt


def class_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 prompt: PromptOutput | None) -> torch.Tensor:
    """Class logits ``(B, C)`` of a sequence classifier with the prompt in front of every row's input.

    As PEFT does for ``SEQ_CLS``: the prompt embeddings are prepended to the (right-padded) input embeddings
    and the model's own embedding layer adds positions from 0, so the pooled first position is the first
    virtual token. The prompt's head tensors replace the model's head for this call only
    (``functional_call``), so every task brings its own head and label count to the same frozen model.
    """
    prompt = _classifier_prompt(model, prompt)
    text = model.get_input_embeddings()(input_ids)  # (B, T, H)
    mask = attention_mask
    if prompt.embeds is not None:
        b, p = input_ids.shape[0], prompt.embeds.shape[0]
        text = torch.cat([prompt.embeds.to(text)[None].expand(b, -1, -1), text], dim=1)  # (B, P+T, H)
        mask = torch.cat([torch.ones(b, p, dtype=mask.dtype, device=mask.device), mask], dim=1)
    limit = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    if limit and text.shape[1] > limit:
        raise InjectionError(f"prompt + input is {text.shape[1]} tokens, more than the model's "
                             f"{limit} positions: lower --max-length or --num-virtual-tokens")
    params = prompt.head.overrides(text) if prompt.head is not None else {}
    out = torch.func.functional_call(model, params, (), {"inputs_embeds": text, "attention_mask": mask})
    return out.logits.float()


def target_loss(model, batch, prompt_kv: PromptKV | RowPrompts | torch.Tensor | None) -> torch.Tensor:
    """Mean cross-entropy over all target tokens of the batch (logits only where targets are).

    For an encoder-decoder the source (after the prompt) is the encoder input and the target the labels.
    For a sequence classifier it is the cross-entropy of the class logits against ``batch.class_labels``.
    """
    if is_sequence_classifier(model):
        if batch.class_labels is None:
            raise InjectionError("a sequence classifier trains on class labels: encode the examples with "
                                 "encode_classes")
        return F.cross_entropy(class_logits(model, batch.input_ids, batch.attention_mask, prompt_kv),
                               batch.class_labels)
    if is_seq2seq(model):
        lp, real = _seq2seq_token_logprobs(model, batch, prompt_kv)
        return -lp.sum() / real.sum()
    hs, targets, _ = _target_hidden(model, batch, prompt_kv)
    return F.cross_entropy(logits_from_hidden(model, hs), targets)


def target_logprobs(model, batch, prompt_kv: PromptKV | RowPrompts | torch.Tensor | None) -> torch.Tensor:
    """Sum of log-probabilities of each row's target tokens: ``(B,)``."""
    if is_seq2seq(model):
        return _seq2seq_token_logprobs(model, batch, prompt_kv)[0].sum(-1)
    hs, targets, rows = _target_hidden(model, batch, prompt_kv)
    lp = torch.log_softmax(logits_from_hidden(model, hs), dim=-1)  # (N, V)
    tok = lp.gather(1, targets[:, None])[:, 0]  # (N,)
    out = torch.zeros(batch.input_ids.shape[0], dtype=tok.dtype, device=tok.device)
    return out.index_add_(0, rows, tok)


def last_token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        prompt_kv: PromptKV | RowPrompts | torch.Tensor | None) -> torch.Tensor:
    """Log-probabilities of the token following each row's last real token: ``(B, V)``."""
    h = final_hidden(model, input_ids, attention_mask, prompt_kv)  # (B, T, H)
    last = attention_mask.long().cumsum(-1).argmax(-1)  # (B,) index of the last real token
    return torch.log_softmax(logits_from_hidden(model, h[torch.arange(h.shape[0]), last]), dim=-1)


def text_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                prompt_kv: PromptKV | RowPrompts | torch.Tensor | None = None) -> torch.Tensor:
    """Full logits over the text positions ``(B, T, V)`` (interop tests and small inputs only)."""
    return logits_from_hidden(model, final_hidden(model, input_ids, attention_mask, prompt_kv))


@dataclass
class RowSampling:
    """How one row is decoded: greedy when ``temperature == 0``, else sampled with its own generator."""

    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    generator: torch.Generator | None = None


@dataclass
class Decoded:
    """New token ids per row (EOS excluded) and why each row ended: ``eos``, ``length`` or ``stop``."""

    tokens: list[list[int]]
    finish: list[str]


@torch.no_grad()
def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
           prompt_kv: PromptKV | RowPrompts | None, rows: list[RowSampling], eos_token_id: int | None,
           should_stop: Callable[[int, list[int]], bool] | None = None) -> Decoded:
    """Decode after left- or right-padded inputs, each row with its own settings.

    Args:
        prompt_kv: one prompt for all rows, one per row, or none.
        rows: decoding settings of each row.
        eos_token_id: ends a row (not included in its tokens).
        should_stop: called with (row, tokens so far) after each new token; True ends the row (e.g. a
            stop string appeared).
    """
    b = input_ids.shape[0]
    if len(rows) != b:
        raise InjectionError(f"{len(rows)} sampling settings for a batch of {b} rows")
    if is_sequence_classifier(model):
        raise InjectionError(f"{type(model).__name__} is a sequence classifier: it predicts classes, it does not "
                             "generate text")
    if is_seq2seq(model):
        return _seq2seq_decode(model, input_ids, attention_mask, prompt_kv, rows, eos_token_id)
    cache, prefix_mask, offset = _prefix(model, prompt_kv, b, attention_mask)
    if cache is None:
        cache = DynamicCache(config=model.config)
    mask = attention_mask if prefix_mask is None else torch.cat([prefix_mask, attention_mask], dim=1)  # (B, L+T)
    pos = text_position_ids(attention_mask, offset)  # (B, T)
    out = _base_forward(model, input_ids=input_ids, attention_mask=mask, position_ids=pos, cache=cache,
                        use_cache=True)
    # the next token follows each row's last real token; with right padding that is not column T-1
    last = attention_mask.long().cumsum(-1).argmax(-1)  # (B,) index of the last real token
    h = out.last_hidden_state[torch.arange(b), last]  # (B, H)
    next_pos = pos[torch.arange(b), last] + 1  # (B,)
    # with right padding the pad columns stay in the cache but remain masked out for the new tokens
    finish: list[str | None] = [None if r.max_new_tokens > 0 else "length" for r in rows]
    new: list[list[int]] = [[] for _ in range(b)]
    uniform = all((r.temperature, r.top_k, r.top_p, r.generator) == (rows[0].temperature, rows[0].top_k,
                  rows[0].top_p, rows[0].generator) for r in rows)
    for _ in range(max((r.max_new_tokens for r in rows), default=0)):
        if all(f is not None for f in finish):
            break
        logits = logits_from_hidden(model, h)  # (B, V)
        if uniform:
            tok = sample_next(logits, rows[0].temperature, rows[0].top_k, rows[0].top_p, rows[0].generator)
        else:  # per-row settings; each row draws from its own generator, whatever the batch holds
            tok = torch.cat([sample_next(logits[i:i + 1], r.temperature, r.top_k, r.top_p, r.generator)
                             for i, r in enumerate(rows)])
        for i in range(b):
            if finish[i] is not None:
                continue
            t = int(tok[i])
            if eos_token_id is not None and t == eos_token_id:
                finish[i] = "eos"
                continue
            new[i].append(t)
            if should_stop is not None and should_stop(i, new[i]):
                finish[i] = "stop"
            elif len(new[i]) >= rows[i].max_new_tokens:
                finish[i] = "length"
        if all(f is not None for f in finish):
            break
        mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype, device=mask.device)], dim=1)
        out = _base_forward(model, input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                            cache=_out_cache(out), use_cache=True)
        h = out.last_hidden_state[:, -1]
        next_pos = next_pos + 1
    return Decoded(tokens=new, finish=[f or "length" for f in finish])


def _seq2seq_decode(model, input_ids, attention_mask, embeds, rows: list[RowSampling], eos_token_id) -> Decoded:
    """Greedy decoding of an encoder-decoder with the prompt in front of the encoder input (one row at a time)."""
    if any(r.temperature > 0 for r in rows):
        raise InjectionError("sampling is implemented for decoder-only models; use greedy decoding with T5")
    out_tokens, finish = [], []
    for i, r in enumerate(rows):
        ids = input_ids[i][attention_mask[i].bool()][None]  # (1, S)
        text = model.get_input_embeddings()(ids)
        if embeds is not None:
            text = torch.cat([embeds.to(text)[None], text], dim=1)
        gen = model.generate(inputs_embeds=text, attention_mask=torch.ones(text.shape[:2], dtype=torch.long,
                                                                           device=text.device),
                             max_new_tokens=r.max_new_tokens, do_sample=False, eos_token_id=eos_token_id)
        toks = [int(t) for t in gen[0, 1:]]  # drop the decoder start token
        done = eos_token_id is not None and eos_token_id in toks
        toks = toks[:toks.index(eos_token_id)] if done else toks
        out_tokens.append(toks)
        finish.append("eos" if done else "length")
    return Decoded(tokens=out_tokens, finish=finish)


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             prompt_kv: PromptKV | RowPrompts | None, max_new_tokens: int, eos_token_id: int | None,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             generator: torch.Generator | None = None) -> list[list[int]]:
    """Decode every row with the same settings; greedy when ``temperature == 0``.

    Returns the new token ids of each row, without the EOS token.
    """
    rows = [RowSampling(max_new_tokens, temperature, top_k, top_p, generator)] * input_ids.shape[0]
    return decode(model, input_ids, attention_mask, prompt_kv, rows, eos_token_id).tokens


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row from ``(B, V)`` logits: argmax, or temperature/top-k/top-p sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    # shifted so the best token is 0 before dividing: a tiny temperature gives -inf to the others, never
    # inf - inf = NaN (it then picks the argmax, as the limit of sampling at temperature -> 0 does)
    # (a temperature below float32's smallest normal would round to 0 and give 0 / 0)
    logits = logits.float()
    logits = (logits - logits.amax(-1, keepdim=True)) / max(temperature, torch.finfo(torch.float32).tiny)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) > top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    gen_device = generator.device if generator is not None else probs.device
    return torch.multinomial(probs.to(gen_device), 1, generator=generator)[:, 0].to(probs.device)

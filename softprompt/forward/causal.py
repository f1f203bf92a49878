"""Decoder-only language models: the prompt's keys/values computed once and shared by every row.

A soft prompt occupies the first ``P`` positions of every row. In a causal LM those positions attend only
to each other, so their keys/values are identical for every row of a batch and for every request: we run
the prompt through the model once (batch 1), keep the per-layer keys/values (:class:`PromptKV`) and let
the text tokens attend to them through the model's public cache argument (``cache`` from transformers
5.24, ``past_key_values`` before; :func:`~softprompt.forward.common.base_forward` picks the one the
installed version takes). In training the keys/values carry gradients back to the prompt; expanding them
over the batch is a view, and autograd sums the rows' gradients. This gives the same result as prepending
the prompt to ``inputs_embeds`` of every row (tests check logits and gradients) while computing the prompt
once instead of ``B`` times.

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

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from softprompt.data import Encoded, Example, encode, encode_chat, is_chat, label_room, leading_special_ids
from softprompt.data.corpus import encode_corpus
from softprompt.forward.common import (
    Decoded,
    InjectionError,
    PromptKV,
    RowPrompts,
    RowSampling,
    TokenLogprob,
    base_forward,
    by_length,
    check_pass,
    check_prompt,
    holds_nothing,
    id_set,
    label_token_ids,
    out_cache,
    per_layer_kwargs,
    prompt_embeds,
    rows_per_label,
    sample_next,
    shared_kv_sources,
    text_config,
    text_position_ids,
    token_logprobs,
)
from softprompt.forward.family import Family
from softprompt.forward.head import head_problem, logits_from_hidden
from softprompt.forward.probe import prompt_problems
from softprompt.forward.prompt import PromptOutput

#: A causal LM's batch prompt: one prompt's shared keys/values, one per row, ``(P, H)`` embeddings to
#: prepend to every row (the ``concat`` training pass), or none.
CausalPrompt = PromptKV | RowPrompts | torch.Tensor | None


def compute_prompt_kv(model, prompt: PromptOutput | torch.Tensor) -> PromptKV | None:
    """Run the prompt through the frozen model once and keep its keys/values (None: the method has no prompt).

    Gradients flow through the result when the prompt requires grad (training); call under
    ``torch.no_grad()`` for inference.
    """
    if isinstance(prompt, PromptOutput) and prompt.kv is None and prompt.embeds is None:
        return None  # a method without a prompt (weight tuning in the comparison harness)
    concat, cached = prompt_problems(model)  # checked once per model: plain keys/values, the plain forward's result
    if cached:
        raise InjectionError(cached if concat else f"{cached}; a training step can still prepend the prompt to "
                             "every row (the concat pass)")
    num_layers = text_config(model.config).num_hidden_layers  # a composite's decoder: its text config
    if isinstance(prompt, PromptOutput) and prompt.kv is not None:  # prefix methods: keys/values directly
        layers = [(k.to(device=model.device, dtype=model.dtype), v.to(device=model.device, dtype=model.dtype))
                  for k, v in prompt.kv]
        if len(layers) != num_layers or any(k.ndim != 4 or k.shape[0] != 1 for k, _ in layers):
            raise InjectionError(f"prefix has {len(layers)} layers of shape {tuple(layers[0][0].shape)}; expected "
                                 f"{num_layers} of (1, kv_heads, P, head_dim)")
        # a layer that reuses an earlier layer's keys/values (Gemma 3n) reads that layer's prefix, never its own
        sources = shared_kv_sources(model)
        return PromptKV(layers=[layers[sources.get(i, i)] for i in range(len(layers))], length=prompt.length)
    embeds = prompt_embeds(prompt)
    check_prompt(model, embeds)
    return prompt_cache(model, embeds)


def prompt_cache(model, embeds: torch.Tensor) -> PromptKV:
    """``(P, H)`` prompt embeddings run through the model once (batch 1): the keys/values of every layer,
    checked to be all the state its cache keeps (what :func:`compute_prompt_kv` returns, unprobed)."""
    # a copy: some models scale inputs_embeds in place (CTRL), which would scale the caller's prompt (and fail
    # on a leaf that requires grad)
    embeds = embeds.to(device=model.device, dtype=model.dtype).clone()[None]  # (1, P, H)
    p, name = embeds.shape[1], type(model).__name__
    out = base_forward(model, inputs_embeds=embeds, position_ids=torch.arange(p, device=model.device)[None],
                        use_cache=True, **per_layer_kwargs(model, None, p))
    cache = out_cache(out)
    if type(cache) is not DynamicCache:
        raise InjectionError(f"{name}'s forward returns {type(cache).__name__ if cache is not None else 'no cache'} "
                             "where softprompt keeps a prompt as a DynamicCache of keys and values per layer")
    sources = shared_kv_sources(model)
    for i, layer in enumerate(cache.layers):
        if i in sources and holds_nothing(cache, i):
            continue  # it attends to its source layer's keys/values: kept in its place below
        if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer) or layer.keys is None:
            raise InjectionError(f"layer {i} of {name}'s cache is a {type(layer).__name__}: it keeps other state than "
                                 "keys and values (recurrent, convolution or shared keys/values), which a cached "
                                 "prompt would lose")
    layers = [(cache.layers[sources.get(i, i)].keys, cache.layers[sources.get(i, i)].values)
              for i in range(len(cache.layers))]
    num_layers = text_config(model.config).num_hidden_layers
    if len(layers) != num_layers:
        raise InjectionError(f"prompt cache has {len(layers)} layers, model config says {num_layers}")
    return PromptKV(layers=layers, length=p)


def prompt_for_step(model, prompt: PromptOutput | torch.Tensor, mode: str = "auto") -> PromptKV | torch.Tensor | None:
    """The prompt as the forward functions take it for one training step.

    ``shared_kv`` computes the prompt's keys/values once (batch 1) and shares them over the rows: less
    compute, one more (small) forward. ``concat`` returns the ``(P, H)`` embeddings, which
    :func:`final_hidden` prepends to every row in a single forward. ``auto`` takes ``concat`` on CUDA
    (launch-bound at prompt-tuning batch sizes) and on a model that cannot cache a prompt
    (:func:`~softprompt.forward.probe.prompt_problems`), ``shared_kv`` elsewhere (compute-bound).
    """
    check_pass(mode)
    if isinstance(prompt, PromptOutput) and prompt.embeds is None:
        return compute_prompt_kv(model, prompt)  # a prefix (or no prompt): nothing to concatenate
    if mode == "auto":
        mode = "concat" if model.device.type == "cuda" or prompt_problems(model)[1] else "shared_kv"
    if mode == "concat":
        problem = prompt_problems(model)[0]  # raised here, before the step, as well as by final_hidden
        if problem:
            raise InjectionError(problem)
        embeds = prompt_embeds(prompt)
        check_prompt(model, embeds)
        return embeds
    return compute_prompt_kv(model, prompt)


def _prefix(model, prompt: PromptKV | RowPrompts | None, b: int, like: torch.Tensor):
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
        if not holds_nothing(cache, i):
            cache.update(k, v, i)
    return cache, prompt.prefix_mask.to(like.dtype), prompt.lengths[:, None]


def final_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 prompt_kv: CausalPrompt = None) -> torch.Tensor:
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
        problem = prompt_problems(model)[0]  # checked once per model
        if problem:
            raise InjectionError(problem)
        return concat_hidden(model, input_ids, attention_mask, prompt_kv)
    cache, prefix_mask, offset = _prefix(model, prompt_kv, b, attention_mask)
    mask = attention_mask if prefix_mask is None else torch.cat([prefix_mask, attention_mask], dim=1)  # (B, L+T)
    out = base_forward(model, input_ids=input_ids, attention_mask=mask, cache=cache,
                        position_ids=text_position_ids(attention_mask, offset), use_cache=False)
    return out.last_hidden_state  # (B, T, H)


def concat_hidden(model, input_ids, attention_mask, embeds: torch.Tensor) -> torch.Tensor:
    """The prompt prepended to every row's ``inputs_embeds``; positions as in the shared-KV pass."""
    b, p = input_ids.shape[0], embeds.shape[0]
    text = model.get_input_embeddings()(input_ids)  # (B, T, H)
    prompt = embeds.to(device=text.device, dtype=text.dtype)[None].expand(b, -1, -1)  # (B, P, H)
    ones = torch.ones(b, p, dtype=attention_mask.dtype, device=attention_mask.device)
    pos = torch.cat([torch.arange(p, device=input_ids.device)[None].expand(b, -1),
                     text_position_ids(attention_mask, p)], dim=1)  # (B, P+T)
    out = base_forward(model, inputs_embeds=torch.cat([prompt, text], dim=1),
                        attention_mask=torch.cat([ones, attention_mask], dim=1), position_ids=pos, use_cache=False,
                        **per_layer_kwargs(model, input_ids, p, b))
    return out.last_hidden_state[:, p:]  # (B, T, H)


def _target_hidden(model, batch, prompt_kv: CausalPrompt):
    """Hidden states that predict each target token, the target ids, and each one's row index."""
    if batch.target_mask[:, 0].any():
        raise InjectionError("a target token sits at position 0: every example needs a non-empty source")
    h = final_hidden(model, batch.input_ids, batch.attention_mask, prompt_kv)  # (B, T, H)
    sel = batch.target_mask[:, 1:]  # token t is predicted from position t-1
    rows = torch.nonzero(sel, as_tuple=True)[0]  # (N,)
    return h[:, :-1][sel], batch.input_ids[:, 1:][sel], rows  # (N, H), (N,), (N,)


def target_loss(model, batch, prompt_kv: CausalPrompt) -> torch.Tensor:
    """Mean cross-entropy over all target tokens of the batch (logits only where targets are)."""
    hs, targets, _ = _target_hidden(model, batch, prompt_kv)
    return F.cross_entropy(logits_from_hidden(model, hs), targets)


def target_logprobs(model, batch, prompt_kv: CausalPrompt) -> torch.Tensor:
    """Sum of log-probabilities of each row's target tokens: ``(B,)``."""
    hs, targets, rows = _target_hidden(model, batch, prompt_kv)
    lp = torch.log_softmax(logits_from_hidden(model, hs), dim=-1)  # (N, V)
    tok = lp.gather(1, targets[:, None])[:, 0]  # (N,)
    out = torch.zeros(batch.input_ids.shape[0], dtype=tok.dtype, device=tok.device)
    return out.index_add_(0, rows, tok)


def last_token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        prompt_kv: CausalPrompt) -> torch.Tensor:
    """Log-probabilities of the token following each row's last real token: ``(B, V)``."""
    h = final_hidden(model, input_ids, attention_mask, prompt_kv)  # (B, T, H)
    last = attention_mask.long().cumsum(-1).argmax(-1)  # (B,) index of the last real token
    return torch.log_softmax(logits_from_hidden(model, h[torch.arange(h.shape[0]), last]), dim=-1)


@torch.no_grad()
def label_scores(model, tokenizer, prompt_kv: PromptKV | None, examples: list[Example], fmt, batch_size: int,
                 max_length: int = 256, lead: list[int] | tuple = ()) -> torch.Tensor:
    """Log-likelihood of every label for every example: ``(N, num_labels)``.

    A label's score is the summed log-probability of its tokens after the source (which starts with
    ``lead``, see :func:`~softprompt.data.encode`). When every label is a single distinct token, one forward
    per example gives all scores at the last source position; otherwise each (example, label) pair is one row.
    """
    label_ids = label_token_ids(tokenizer, fmt)
    if not (all(len(ids) == 1 for ids in label_ids) and len({ids[0] for ids in label_ids}) == len(label_ids)):
        return rows_per_label(model, tokenizer, prompt_kv, examples, fmt, batch_size, max_length, target_logprobs,
                              lead)
    enc = encode(tokenizer, [Example(ex.source, fmt.label_texts[0]) for ex in examples], max_length=max_length,
                 lead=lead)
    sources = [Encoded(e.input_ids[:e.target_start], e.target_start) for e in enc]
    cols = torch.tensor([ids[0] for ids in label_ids], device=model.device)

    def first_token(batch):
        batch = batch.to(model.device)
        lp = last_token_logprobs(model, batch.input_ids, batch.attention_mask, prompt_kv)  # (B, V)
        return lp[:, cols].float().cpu()  # (B, L)

    # right-padded: transformers counts a sliding window in columns, so left padding would shift a row's
    # window over the prompt's keys (the last real token is found either way)
    return by_length(sources, batch_size, tokenizer.pad_token_id, "right", first_token)


@torch.no_grad()
def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_kv: PromptKV | RowPrompts | None,
           rows: list[RowSampling], eos_token_id: int | Iterable[int] | None,
           should_stop: Callable[[int, list[int], list[TokenLogprob] | None], bool] | None = None,
           row_end_ids: list[frozenset[int]] | None = None) -> Decoded:
    """Decode after left- or right-padded inputs, each row with its own settings.

    Args:
        prompt_kv: one prompt for all rows, one per row, or none.
        rows: decoding settings of each row.
        eos_token_id: the id, or ids (:func:`end_token_ids`), that end a row (not included in its tokens).
        should_stop: called with (row, tokens so far, their :class:`TokenLogprob` so far or None when the
            row does not ask for them) after each new token; True ends the row (e.g. a stop string appeared).
        row_end_ids: more ids that end each row, like ``eos_token_id`` (a chat task's end of turn).
    """
    b = input_ids.shape[0]
    if len(rows) != b:
        raise InjectionError(f"{len(rows)} sampling settings for a batch of {b} rows")
    ends = id_set(eos_token_id)
    cache, prefix_mask, offset = _prefix(model, prompt_kv, b, attention_mask)
    if cache is None:
        cache = DynamicCache(config=model.config)
    mask = attention_mask if prefix_mask is None else torch.cat([prefix_mask, attention_mask], dim=1)  # (B, L+T)
    pos = text_position_ids(attention_mask, offset)  # (B, T)
    out = base_forward(model, input_ids=input_ids, attention_mask=mask, position_ids=pos, cache=cache,
                        use_cache=True)
    # the next token follows each row's last real token; with right padding that is not column T-1
    last = attention_mask.long().cumsum(-1).argmax(-1)  # (B,) index of the last real token
    h = out.last_hidden_state[torch.arange(b), last]  # (B, H)
    next_pos = pos[torch.arange(b), last] + 1  # (B,)
    # with right padding the pad columns stay in the cache but remain masked out for the new tokens
    finish: list[str | None] = [None if r.max_new_tokens > 0 else "length" for r in rows]
    new: list[list[int]] = [[] for _ in range(b)]
    want = [i for i, r in enumerate(rows) if r.logprobs is not None]
    lps: list[list[TokenLogprob] | None] = [[] if r.logprobs is not None else None for r in rows]
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
        step_lp = {}
        if want:
            sel = torch.tensor(want, device=logits.device)
            step_lp = dict(zip(want, token_logprobs(logits[sel], tok[sel], max(rows[i].logprobs for i in want)),
                               strict=True))
        for i in range(b):
            if finish[i] is not None:
                continue
            t = int(tok[i])
            if t in ends or (row_end_ids is not None and t in row_end_ids[i]):
                finish[i] = "eos"
                continue
            new[i].append(t)
            if i in step_lp:
                got = step_lp[i]
                lps[i].append(TokenLogprob(got.token, got.logprob, got.top[:rows[i].logprobs]))
            if should_stop is not None and should_stop(i, new[i], lps[i]):
                finish[i] = "stop"
            elif len(new[i]) >= rows[i].max_new_tokens:
                finish[i] = "length"
        if all(f is not None for f in finish):
            break
        mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype, device=mask.device)], dim=1)
        out = base_forward(model, input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                            cache=out_cache(out), use_cache=True)
        h = out.last_hidden_state[:, -1]
        next_pos = next_pos + 1
    return Decoded(tokens=new, finish=[f or "length" for f in finish], logprobs=lps)


class CausalLM(Family):
    """A decoder-only LM (``*ForCausalLM``): cached prompt keys/values, mixed-task prefix batches."""

    name = "causal_lm"
    peft_task_type = "CAUSAL_LM"
    description = "a decoder-only language model"
    caches_prompt = True
    models_text = True

    def from_pretrained(self, name_or_path, dtype, num_labels=None):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)

    def model_problem(self, model):
        cached = prompt_problems(model)[1]
        return head_problem(model) or (cached and f"{cached}; softprompt evaluates, generates and serves with a "
                                                 "cached prompt")

    def lead_ids(self, tokenizer, bos=True):
        # PEFT's layout, [prompt, BOS, text]: the model reads text as in pre-training, right after the prompt
        return leading_special_ids(tokenizer) if bos else []

    def encode_examples(self, tokenizer, examples, fmt, max_length, bos=True):
        if fmt.objective == "lm":  # plain text: each example's target is one document, cut into chunks
            return encode_corpus(tokenizer, [ex.target for ex in examples], max_length, fmt.min_tokens)
        if is_chat(fmt):  # conversations: the chat template's tokens (its own BOS), targets on assistant turns
            return encode_chat(tokenizer, examples, fmt, max_length)
        return encode(tokenizer, examples, max_length=max_length, append_eos=not fmt.is_classification,
                      lead=self.lead_ids(tokenizer, bos), target_room=label_room(tokenizer, fmt))

    def label_lengths(self, tokenizer, fmt):
        return [len(ids) for ids in label_token_ids(tokenizer, fmt)]

    def inference_prompt(self, model, prompt) -> PromptKV | None:
        return None if prompt is None else compute_prompt_kv(model, prompt)

    def step_prompt(self, model, prompt, mode="auto") -> PromptKV | torch.Tensor | None:
        return prompt_for_step(model, prompt, mode)

    def loss(self, model, batch, prompt):
        return target_loss(model, batch, prompt)

    def target_logprobs(self, model, batch, prompt):
        return target_logprobs(model, batch, prompt)

    def label_scores(self, model, tokenizer, prompt, examples, fmt, batch_size, max_length=256, bos=True):
        return label_scores(model, tokenizer, prompt, examples, fmt, batch_size, max_length,
                            self.lead_ids(tokenizer, bos))

    def decode(self, model, input_ids, attention_mask, prompt, rows, eos_token_id, should_stop=None):
        return decode(model, input_ids, attention_mask, prompt, rows, eos_token_id, should_stop)

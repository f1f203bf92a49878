"""What every model family's forward code shares: the cache-argument shim, prompt key/value types, text
positions, per-row decoding settings and token sampling, and batching for label scores."""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from softprompt.data import Encoded, Example, TaskFormat, batches, encode, label_room
from softprompt.forward.prompt import PromptOutput


class InjectionError(RuntimeError):
    """A shape or model mismatch when injecting a prompt."""


PROMPT_PASSES = ("auto", "shared_kv", "concat")


def check_pass(mode: str) -> None:
    """Raise :class:`InjectionError` unless ``mode`` is one of :data:`PROMPT_PASSES`."""
    if mode not in PROMPT_PASSES:
        raise InjectionError(f"prompt pass {mode!r} is not one of {', '.join(PROMPT_PASSES)}")

_CACHE_KWARG: dict[type, str | None] = {}


def decoder_of(model):
    """The decoder stack softprompt runs: ``model.base_model``, or the ``model`` submodule of a head class whose
    ``base_model_prefix`` names none of its submodules (``Llama4ForCausalLM``: the prefix is ``language_model``,
    so ``base_model`` is the whole model)."""
    base = model.base_model
    inner = getattr(model, "model", None) if base is model else None
    return inner if isinstance(inner, torch.nn.Module) else base


def base_forward(model, cache=None, **kwargs):
    """Call the decoder stack (:func:`decoder_of`) passing ``cache`` under the name this version uses.

    transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns and goes in 5.40).
    """
    return cached_call(decoder_of(model), cache, **kwargs)


def text_decoder(model):
    """The decoder's text layers: :func:`decoder_of`, or its ``language_model`` in a composite (a Gemma 4
    checkpoint loads as ``Gemma4ForConditionalGeneration``, whose decoder stack wraps the text model)."""
    decoder = decoder_of(model)
    inner = getattr(decoder, "language_model", None)
    return inner if not hasattr(decoder, "layers") and isinstance(inner, torch.nn.Module) else decoder


def per_layer_kwargs(model, ids: torch.Tensor | None, virtual: int, rows: int = 1) -> dict:
    """What a forward of ``inputs_embeds`` must add on a decoder with per-layer embeddings (Gemma 3n, Gemma 4
    E2B/E4B): each layer also reads an embedding of each position's token id, which the model otherwise
    recovers by matching ``inputs_embeds`` against its embedding rows, and a prompt's rows match none. The
    ``virtual`` prompt positions take the pad token's (as transformers gives image and audio positions), the
    text positions their ``ids``' ((rows, T), or None: no text). ``{}`` for every other decoder."""
    decoder = text_decoder(model)
    if not getattr(decoder, "hidden_size_per_layer_input", 0) or not hasattr(decoder, "get_per_layer_inputs"):
        return {}
    pad = getattr(text_config(model.config), "pad_token_id", None)
    device = model.get_input_embeddings().weight.device
    parts = [torch.full((rows, virtual), 0 if pad is None else int(pad), dtype=torch.long, device=device)]
    if ids is not None:
        parts.append(ids.to(device))
    return {"per_layer_inputs": decoder.get_per_layer_inputs(torch.cat(parts, dim=1))}


def shared_kv_sources(model) -> dict[int, int]:
    """Layers that attend to another layer's keys/values instead of their own (Gemma 3n, Gemma 4 E2B/E4B: from
    some depth on, each layer reuses those of the last earlier layer of its type that stores them): ``{layer:
    source}``. Their cache slot holds nothing; a cached prompt keeps the source's keys/values there, which is
    what the layer attends to. ``{}`` for a model without such layers."""
    layers = getattr(text_decoder(model), "layers", None)
    types = getattr(text_config(model.config), "layer_types", None)
    if layers is None or types is None:
        return {}
    out, last_store = {}, {}
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if getattr(attn, "is_kv_shared_layer", False) and types[i] in last_store:
            out[i] = last_store[types[i]]
        if getattr(attn, "store_full_length_kv", False):
            last_store[types[i]] = i
    return out


def cached_call(module, cache=None, **kwargs):
    """Call ``module`` (a decoder stack, or a whole encoder-decoder) with ``cache`` under the name it takes; a
    module that takes neither (Mamba's ``cache_params``, RWKV's ``state``) gets no cache argument when there is
    none."""
    kind = type(module)
    if kind not in _CACHE_KWARG:
        params = inspect.signature(module.forward).parameters
        _CACHE_KWARG[kind] = next((n for n in ("cache", "past_key_values") if n in params), None)
    name = _CACHE_KWARG[kind]
    if name is None and cache is None:
        return module(**kwargs)
    return module(**{name or "past_key_values": cache}, **kwargs)


def text_config(config):
    """The decoder's own config: ``config`` itself, or its text part for a composite (a vision-language
    checkpoint such as Gemma 3 4B-27B, loaded as ``*ForConditionalGeneration``, keeps its layer count,
    window and soft-capping there)."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def out_cache(out):
    """The cache a forward returned, under either field name (None: it returned none)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


SPECIAL_ID_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id", "mask_token_id", "sep_token_id",
                   "cls_token_id", "decoder_start_token_id", "forced_bos_token_id", "forced_eos_token_id")


def probe_ids(model, n: int = 3, seed: int | None = None) -> torch.Tensor:
    """``(1, n)`` ordinary token ids to compare a model's forward on ids with its forward on embeddings: from the
    middle of the vocabulary (``seed``: drawn at random, with that seed), none that its config names special (a
    padding id, M2M100's 1, is masked from its positions on ids only, so it made every such model look as if it
    computed something else)."""
    special = set()
    for cfg in (model.config, getattr(model, "generation_config", None)):
        for key in SPECIAL_ID_KEYS:
            value = getattr(cfg, key, None)
            special.update(value if isinstance(value, list | tuple) else [value])
    weight = model.get_input_embeddings().weight
    vocab = weight.shape[0]
    if seed is not None:
        pool = torch.tensor([i for i in range(min(3, vocab - 1), vocab) if i not in special])
        picks = torch.randint(0, len(pool), (n,), generator=torch.Generator().manual_seed(seed))
        return pool[picks][None].to(weight.device)
    ids = [i for i in range(vocab // 2, vocab) if i not in special][:n]
    return torch.tensor([ids], device=model.device)


def check_prompt(model, embeds: torch.Tensor) -> None:
    """Raise :class:`InjectionError` unless ``embeds`` is ``(P, H)`` with the model's hidden size ``H``."""
    hidden = model.get_input_embeddings().weight.shape[1]
    if embeds.ndim != 2 or embeds.shape[1] != hidden:
        raise InjectionError(f"prompt embeddings have shape {tuple(embeds.shape)}, expected (P, {hidden}) "
                             f"for {type(model).__name__} (hidden size {hidden})")


def prompt_embeds(prompt: PromptOutput | torch.Tensor) -> torch.Tensor | None:
    """The ``(P, H)`` embeddings of a method's output or of a bare tensor (None: the method has none)."""
    return prompt.embeds if isinstance(prompt, PromptOutput) else prompt


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
            if not holds_nothing(cache, i):
                cache.update(k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1), i)
        return cache


def holds_nothing(cache: DynamicCache, layer: int) -> bool:
    """Whether ``cache``'s slot ``layer`` keeps no keys/values (a layer that reuses another's, see
    :func:`shared_kv_sources`): it is skipped when a prompt is put into the cache."""
    return type(cache.layers[layer]).__name__ == "DummyLayer"


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


def text_position_ids(attention_mask: torch.Tensor, offset: int | torch.Tensor) -> torch.Tensor:
    """Positions of text tokens after ``offset`` prompt tokens (an int, or ``(B, 1)`` per row), skipping
    padding: ``(B, T)``."""
    pos = attention_mask.long().cumsum(-1) - 1 + offset  # (B, T)
    return pos.clamp(min=offset) if isinstance(offset, int) else torch.maximum(pos, offset)


def end_token_ids(model, tokenizer) -> tuple[int, ...]:
    """The ids that end a generated answer: the tokenizer's EOS and every EOS id of the model's generation
    config (chat models end a turn with their own token there: Gemma's ``<end_of_turn>``, Llama 3's
    ``<|eot_id|>``, Phi-3's ``<|end|>``), the tokenizer's first."""
    ids = [tokenizer.eos_token_id]
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += list(gen) if isinstance(gen, list | tuple) else [gen]
    return tuple(dict.fromkeys(int(i) for i in ids if isinstance(i, int) and not isinstance(i, bool) and i >= 0))


def id_set(ids: int | Iterable[int] | None) -> frozenset[int]:
    """``ids`` as a set: none, one id, or several (what the decoders take as their end ids)."""
    if ids is None:
        return frozenset()
    return frozenset([int(ids)]) if isinstance(ids, int) else frozenset(int(i) for i in ids)


@dataclass
class RowSampling:
    """How one row is decoded: greedy when ``temperature == 0``, else sampled with its own generator."""

    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    generator: torch.Generator | None = None
    logprobs: int | None = None  # None: none; k >= 0: each new token's log-probability and the k most likely


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (the raw next-token distribution, before
    temperature, top-k or top-p) and the ``k`` most likely tokens there with theirs (OpenAI's
    ``top_logprobs``)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> list[TokenLogprob]:
    """Per row of ``(B, V)`` logits: the ``chosen`` token's log-probability and the top ``k``."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    picked = lp.gather(-1, chosen.to(lp.device)[:, None])[:, 0].tolist()
    if k > 0:
        vals, idx = torch.topk(lp, min(k, lp.shape[-1]), dim=-1)
        tops = [list(zip(i, v, strict=True)) for i, v in zip(idx.tolist(), vals.tolist(), strict=True)]
    else:
        tops = [[] for _ in picked]
    return [TokenLogprob(int(t), p, top) for t, p, top in zip(chosen.tolist(), picked, tops, strict=True)]


@dataclass
class Decoded:
    """New token ids per row (EOS excluded) and why each row ended: ``eos``, ``length`` or ``stop``; with
    ``logprobs``, per row one :class:`TokenLogprob` per new token (None for rows that did not ask)."""

    tokens: list[list[int]]
    finish: list[str]
    logprobs: list[list[TokenLogprob] | None] | None = None


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
        # keep the smallest set whose mass reaches top_p: a token goes once the ones before it reach it (a tie at
        # exactly top_p kept one token too many: [.25] * 4 at 0.5 sampled from three)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    gen_device = generator.device if generator is not None else probs.device
    return torch.multinomial(probs.to(gen_device), 1, generator=generator)[:, 0].to(probs.device)


def label_token_ids(tokenizer, fmt: TaskFormat) -> list[list[int]]:
    """Token ids of each label's verbalizer text, tokenised as a target is (:func:`~softprompt.data.encode`)."""
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in fmt.label_texts]


def by_length(encoded: list[Encoded], batch_size: int, pad_id: int, padding_side: str, fn) -> torch.Tensor:
    """Apply ``fn(batch) -> (B, ...)`` over batches of similar length; results in the original order."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    parts = [fn(b) for b in batches([encoded[i] for i in order], batch_size, pad_id, padding_side=padding_side)]
    out = torch.empty_like(torch.cat(parts))
    out[torch.tensor(order)] = torch.cat(parts)
    return out


def rows_per_label(model, tokenizer, prompt, examples: list[Example], fmt, batch_size: int, max_length: int,
                   logprobs, lead: list[int] | tuple = (), trail: list[int] | tuple = ()) -> torch.Tensor:
    """Label scores ``(N, L)`` with one row per (example, label) pair, scored by ``logprobs(model, batch,
    prompt) -> (B,)`` (the general path of every language-model family); sources start with ``lead`` and
    end with ``trail``."""
    rows = [Example(ex.source, text) for ex in examples for text in fmt.label_texts]
    # every label after the same source: one cut, room for the longest label (as training and the engine cut)
    enc = encode(tokenizer, rows, max_length=max_length, lead=lead, trail=trail,
                 target_room=label_room(tokenizer, fmt))
    scores = by_length(enc, batch_size, tokenizer.pad_token_id, "right",
                       lambda b: logprobs(model, b.to(model.device), prompt).float().cpu())
    return scores.view(len(examples), len(fmt.label_texts))

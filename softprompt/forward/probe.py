"""What a causal LM's prompt paths give on this model, checked once per model against its own forward.

softprompt puts a prompt in front of a causal LM's text two ways: ``concat`` prepends the prompt's embeddings to
every row's (training), and the cached path computes the prompt's keys/values once and lets the text attend to
them (:func:`~softprompt.forward.causal.compute_prompt_kv`: evaluation, generation, serving). Both must equal
the model's own forward of ``[prompt embeddings, text embeddings]``, and a row's results should not depend on
the padding a batch puts between its prompt and its text. Families differ in ways no list of names
keeps up with, so each is checked on the loaded model, on a few tokens, the first time it is needed:

- :func:`prompt_problems`: the model's cache holds plain keys/values per layer (no recurrent, convolution or
  shared-key/value state, which a cached prompt would lose), and the text after the cached prompt (read as
  token ids) equals the text after the prompt prepended to its embeddings (the ``concat`` pass, read as
  embeddings); when not, whether the concat pass alone is right (the model reads ids as their embeddings);
- :func:`sliding_window`: how long a left-padded row may be and still give what it gives alone: a sliding
  window (GPT-Neo's local one too) counts padding columns, and a model whose results depend on the padding
  between a cached prompt and the text (MPT builds ALiBi from column indices) gives 0;
- :func:`rope_switch`: the length past which the model's rotary embedding changes for every row of a forward
  (longrope): rows on either side of it must not share a forward.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from softprompt.forward.common import InjectionError, base_forward, probe_ids, text_config, text_position_ids
from softprompt.forward.head import config_value, evaluating, relative_error, tolerance

_PROBES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> PromptProbe


@dataclass(frozen=True)
class PromptProbe:
    """What the prompt paths give on one model: why the ``concat`` pass and why the cached path cannot run on it
    (None: they can); whether left padding between a cached prompt and the text changes the text's results."""

    concat: str | None = None
    cached: str | None = None
    padding_shifts: bool = False


def probe_prompt(model, p: int = 2) -> torch.Tensor:
    """``(P, H)`` random prompt embeddings at the scale of the model's own (no token's row: a trained prompt is
    none, and a model may look prompt rows up in its embedding matrix)."""
    rows = model.get_input_embeddings()(probe_ids(model, 8, seed=1))[0]  # (8, H)
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(p, rows.shape[1], generator=gen).to(device=rows.device, dtype=rows.dtype)
    return noise * rows.float().std().to(rows.dtype)


def probed(model) -> PromptProbe:
    """The prompt paths of ``model`` checked on a short random prompt and a few tokens, once per model object."""
    try:
        got = _PROBES.get(model)
    except TypeError:  # not weak-referenceable (not an nn.Module): probed on every call
        return _probe(model)
    if got is None:
        got = _PROBES[model] = _probe(model)
    return got


def prompt_problems(model) -> tuple[str | None, str | None]:
    """Why a prompt in front of the text (the ``concat`` pass), and why a cached prompt (its keys/values,
    computed once), cannot run on ``model``: None for each that can. Found once per model object."""
    got = probed(model)
    return got.concat, got.cached


def _probe(model) -> PromptProbe:
    """Few forwards when all is well (the concat pass, the prompt's cache, the text after it); more to say why
    when not."""
    from softprompt.forward.causal import concat_hidden, final_hidden, prompt_cache  # causal builds on this module

    name = type(model).__name__
    with evaluating(model):
        prompt = probe_prompt(model)
        ids = probe_ids(model, 3, seed=2)
        mask = torch.ones_like(ids)
        try:  # the model's forward of [prompt, text] embeddings, with the positions of the head probe
            concat = concat_hidden(model, ids, mask, prompt)  # (1, T, H)
        except Exception as e:  # noqa: BLE001 - any failure: no prompt in front of this model's input
            problem = f"{name} cannot take a prompt in front of its input ({type(e).__name__}: {e})"
            return PromptProbe(problem, problem)
        tol = tolerance(model)
        try:  # the text, as token ids, after the prompt's keys/values
            kv = prompt_cache(model, prompt)
            cached = final_hidden(model, ids, mask, kv)
            err = relative_error(cached, concat)
            why = None if err <= tol else (f"{name} cannot cache a prompt: the text after its cached keys/values "
                                           f"differs from the text after the prompt itself by {err:.2g} (relative)")
        except InjectionError as e:  # the cache holds more than keys/values
            why = f"{name} cannot cache a prompt: {e}"
        except Exception as e:  # noqa: BLE001 - any failure: the cached path does not run on this model
            why = f"{name} cannot cache a prompt ({type(e).__name__}: {e})"
        if why is None:  # the same row after padding columns, as a left-padded batch holds a short row
            pad = torch.zeros(1, 4, dtype=ids.dtype, device=ids.device)
            padded = final_hidden(model, torch.cat([pad, ids], 1), torch.cat([pad, mask], 1), kv)[:, pad.shape[1]:]
            return PromptProbe(padding_shifts=relative_error(padded, cached) > tol)
        # the cached path fails or differs: does the concat pass read the text (as embeddings) as the model reads ids?
        by_ids = final_hidden(model, ids, mask, None)
        by_embeds = base_forward(model, inputs_embeds=model.get_input_embeddings()(ids), attention_mask=mask,
                                 position_ids=text_position_ids(mask, 0), use_cache=False).last_hidden_state
        if relative_error(by_embeds, by_ids) > tol:
            problem = (f"{name} computes something else from token ids than from its embedding module's output "
                       "(inputs_embeds): a prompt of embeddings cannot be put in front of its text")
            return PromptProbe(problem, problem)
        return PromptProbe(None, why)


def padding_shifts(model) -> bool:
    """Whether left padding between a cached prompt and the text changes a short row's results on ``model`` (MPT
    builds ALiBi from column indices, so the padding adds to the prompt's distance). Found once per model
    object; False when the model cannot cache a prompt (nothing is left-padded after one)."""
    return probed(model).padding_shifts


def local_window(cfg) -> int | None:
    """The window of a config's sliding-window layers: ``sliding_window`` (Mistral, Gemma 2/3, Qwen2 with
    ``use_sliding_window``), or GPT-Neo's ``window_size`` for its ``local`` layers; None without one."""
    window = config_value(cfg, "sliding_window")
    if config_value(cfg, "use_sliding_window") is False:
        window = None
    types = config_value(cfg, "layer_types")
    if types is not None and not any("sliding" in str(t) for t in types):
        window = None
    if window is None and "local" in (config_value(cfg, "attention_layers") or ()):
        window = config_value(cfg, "window_size")
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        return None
    return window


def sliding_window(model) -> int | None:
    """How many positions (prompt, text and new tokens) a left-padded row may span and still give what it gives
    alone; None: any. transformers counts a sliding window in cache columns, not positions, so padding between a
    row's prompt and its text shifts the row's window (:func:`local_window`); a model whose results depend on
    that padding at any length (:func:`padding_shifts`) gives 0: generation batches rows of one length."""
    return 0 if padding_shifts(model) else local_window(text_config(model.config))


def rope_switch(model) -> int | None:
    """The sequence length past which the model's rotary embedding changes for all rows of a forward; None: it
    does not. transformers picks a ``longrope`` embedding's factors (Phi-3 128k, Phi-3.5, Phi-4-mini) once per
    forward, the long ones when the forward's largest position id passes ``original_max_position_embeddings``:
    a short row beside a row past it would be read with the long ones. A ``dynamic`` embedding rescales past
    ``max_position_embeddings``, which is also the engine's context: it changes nothing there."""
    cfg = text_config(model.config)
    params = config_value(cfg, "rope_parameters")
    if not isinstance(params, dict):
        return None
    sets = [v for v in params.values() if isinstance(v, dict)] or [params]  # one, or one per layer type
    found = []
    for p in sets:
        kind = str(p.get("rope_type", p.get("type", "")))
        limit = p.get("original_max_position_embeddings") if kind == "longrope" else (
            config_value(cfg, "max_position_embeddings") if "dynamic" in kind else None)
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            found.append(limit)
    return min(found, default=None)

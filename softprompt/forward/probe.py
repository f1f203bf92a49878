"""What a causal LM's prompt paths give on this model, checked once per model against its own forward.

softprompt puts a prompt in front of a causal LM's text two ways: ``concat`` prepends the prompt's embeddings to
every row's (training), and the cached path computes the prompt's keys/values once and lets the text attend to
them (:func:`~softprompt.forward.causal.compute_prompt_kv`: evaluation, generation, serving). Both must equal
the model's own forward of ``[prompt embeddings, text embeddings]``. Families differ in ways no list of names
keeps up with, so each is checked on the loaded model, on a few tokens, the first time it is needed:

- :func:`prompt_problems`: the model's cache holds plain keys/values per layer (no recurrent, convolution or
  shared-key/value state, which a cached prompt would lose), and the text after the cached prompt (read as
  token ids) equals the text after the prompt prepended to its embeddings (the ``concat`` pass, read as
  embeddings); when not, whether the concat pass alone is right (the model reads ids as their embeddings).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from softprompt.forward.common import InjectionError, base_forward, text_position_ids
from softprompt.forward.head import evaluating, probe_ids, relative_error, tolerance

_PROBES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> PromptProbe


@dataclass(frozen=True)
class PromptProbe:
    """What the prompt paths give on one model: why the ``concat`` pass and why the cached path cannot run on it
    (None: they can)."""

    concat: str | None = None
    cached: str | None = None


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
            cached = final_hidden(model, ids, mask, prompt_cache(model, prompt))
            err = relative_error(cached, concat)
            why = None if err <= tol else (f"{name} cannot cache a prompt: the text after its cached keys/values "
                                           f"differs from the text after the prompt itself by {err:.2g} (relative)")
        except InjectionError as e:  # the cache holds more than keys/values
            why = f"{name} cannot cache a prompt: {e}"
        except Exception as e:  # noqa: BLE001 - any failure: the cached path does not run on this model
            why = f"{name} cannot cache a prompt ({type(e).__name__}: {e})"
        if why is None:
            return PromptProbe()
        # the cached path fails or differs: does the concat pass read the text (as embeddings) as the model reads ids?
        by_ids = final_hidden(model, ids, mask, None)
        by_embeds = base_forward(model, inputs_embeds=model.get_input_embeddings()(ids), attention_mask=mask,
                                 position_ids=text_position_ids(mask, 0), use_cache=False).last_hidden_state
        if relative_error(by_embeds, by_ids) > tol:
            problem = (f"{name} computes something else from token ids than from its embedding module's output "
                       "(inputs_embeds): a prompt of embeddings cannot be put in front of its text")
            return PromptProbe(problem, problem)
        return PromptProbe(None, why)

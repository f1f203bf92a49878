"""The LM head as a model applies it: logits from the decoder's hidden states, checked once per model.

softprompt runs a causal LM's decoder stack itself and applies the head only where it needs logits
(:func:`logits_from_hidden`). A model's own forward may do more after the head: a scaling (Granite and its MoE,
hybrid and sliding-window variants divide by ``logits_scaling``, HyperCLOVAX multiplies by it, MiniCPM3 divides
the hidden states by it, Cohere multiplies by ``logit_scale``, Falcon-H1 by ``lm_head_multiplier``) or a
soft-capping (Gemma 2/3: ``final_logit_softcapping``). Which of the operations its config names the model
applies is found once per model (:func:`head_op`) by comparing its own forward on a few token ids with
softprompt's path; a model whose logits none of them reproduces (an encoder-style LM head with its own
dense/activation/LayerNorm transform, positions numbered from ``pad_token_id + 1``, a family nobody tested) is
refused with :class:`~softprompt.forward.common.InjectionError` naming what differs, instead of giving other
log-probabilities, losses and samples than the model does.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch

from softprompt.forward.common import (
    InjectionError,
    base_forward,
    decoder_of,
    probe_ids,
    text_config,
    text_position_ids,
)
from softprompt.forward.slots import MODEL_LOCK

#: Config fields that scale the logits after the head, and whether the model divides by them (a field can do
#: either: Granite divides by ``logits_scaling``, HyperCLOVAX multiplies; the probe tells which).
SCALINGS = (("logit_scale", False), ("logits_scaling", True), ("logits_scaling", False),
            ("lm_head_multiplier", False), ("logits_mup_width_multiplier", True))

_OPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> LogitOp, or why it is refused


@dataclass(frozen=True)
class LogitOp:
    """What a model's forward does to the head's output: ``logits * scale``, then ``tanh(x / cap) * cap``."""

    scale: float = 1.0
    cap: float | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.cap:
            logits = torch.tanh(logits / self.cap) * self.cap
        return logits

    def __str__(self) -> str:
        parts = [f"x {self.scale:g}"] if self.scale != 1.0 else []
        parts += [f"soft-capped at {self.cap:g}"] if self.cap else []
        return ", ".join(parts) or "nothing after the head"


def logits_from_hidden(model, hidden: torch.Tensor) -> torch.Tensor:
    """Apply the LM head and what the model's forward applies after it (:func:`head_op`), in fp32.

    Raises:
        InjectionError: the model's own logits are not reproduced (see :func:`head_op`).
    """
    return head_op(model)(model.get_output_embeddings()(hidden).float())


def head_op(model) -> LogitOp:
    """What ``model`` applies after its head, found on first use and remembered for the model object.

    Raises:
        InjectionError: softprompt's path (decoder hidden states -> ``get_output_embeddings()`` -> one of the
            operations the config names) does not give the model's own logits; the message says what differs.
    """
    try:
        got = _OPS.get(model)
    except TypeError:  # not weak-referenceable (not an nn.Module): probed on every call
        got = probe_head(model)
    else:
        if got is None:
            got = _OPS[model] = probe_head(model)
    if isinstance(got, str):
        raise InjectionError(got)
    return got


def head_problem(model) -> str | None:
    """Why softprompt cannot reproduce ``model``'s logits, or None when it can (:func:`head_op`)."""
    try:
        head_op(model)
    except InjectionError as e:
        return str(e)
    return None


def config_value(cfg, name: str):
    """``cfg.name``, or None where it is missing or cannot be read as one value (a heterogeneous config raises
    for an attribute that varies per layer)."""
    try:
        return getattr(cfg, name, None)
    except Exception:  # noqa: BLE001 - transformers' AmbiguousGlobalPerLayerAttributeError is a RuntimeError
        return None


def _number(value) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value == value and value not in (0, 1)
    return float(value) if ok else None


def candidates(model) -> list[LogitOp]:
    """The operations ``model``'s config names (its text config's first), each with and without a soft-cap."""
    configs = [text_config(model.config), model.config]
    scales: list[float] = []
    caps: list[float | None] = []
    for cfg in configs:
        for name, divide in SCALINGS:
            v = _number(config_value(cfg, name))
            if v is not None:
                scales.append(1.0 / v if divide else v)
        caps.append(_number(config_value(cfg, "final_logit_softcapping")))
    scales = list(dict.fromkeys([*scales, 1.0]))
    caps = list(dict.fromkeys([c for c in caps if c is not None] + [None]))
    return [LogitOp(s, c) for s in scales for c in caps]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max()) / (float(want.float().abs().max()) + 1e-6)


def tolerance(model) -> float:
    return 2e-3 if model.dtype == torch.float32 else 5e-2


@contextlib.contextmanager
def evaluating(model):
    """``model`` in eval mode (no dropout in a comparison), under the model lock and without gradients."""
    was = model.training
    with MODEL_LOCK, torch.no_grad():
        model.eval()
        try:
            yield
        finally:
            model.train(was)


def probe_head(model) -> LogitOp | str:
    """Compare ``model``'s own logits on a few token ids with softprompt's: the operation that reproduces
    them, or why none does."""
    name = type(model).__name__
    with evaluating(model):
        ids = probe_ids(model, 5, seed=0)
        mask = torch.ones_like(ids)
        try:
            own = model(input_ids=ids, attention_mask=mask).logits
        except Exception as e:  # noqa: BLE001 - any failure: the model cannot be run this way
            return f"{name} cannot take prompts: its own forward fails on token ids ({type(e).__name__}: {e})"
        base = decoder_of(model)
        try:
            hidden = base_forward(model, input_ids=ids, attention_mask=mask, position_ids=text_position_ids(mask, 0),
                                  use_cache=False).last_hidden_state  # (1, T, H) what final_hidden computes
            raw = model.get_output_embeddings()(hidden)
        except Exception as e:  # noqa: BLE001
            return (f"{name} cannot take prompts: softprompt runs its decoder stack ({type(base).__name__}) and "
                    f"applies get_output_embeddings() to the hidden states, which fails ({type(e).__name__}: {e})")
        if own is None or raw.shape != own.shape:
            return (f"{name} cannot take prompts: its own logits have shape {tuple(getattr(own, 'shape', ()))}, "
                    f"its output embeddings give {tuple(raw.shape)}")
        tol = tolerance(model)
        ops = candidates(model)
        errors = [relative_error(op(raw.float()), own) for op in ops]
        best = min(range(len(ops)), key=errors.__getitem__)
        if errors[best] <= tol:
            return ops[best]
        # what differs: the hidden states (positions when the model numbers them itself), the head, or both
        default = base_forward(model, input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        why = []
        if relative_error(hidden, default) > tol:
            why.append("its decoder numbers positions otherwise than 0, 1, 2, ... (RoBERTa-style embeddings start "
                       "at pad_token_id + 1)")
        head = model.get_output_embeddings()(default).float()
        if min(relative_error(op(head), own) for op in ops) > tol:
            layer = type(model.get_output_embeddings()).__name__
            why.append(f"its head computes more than get_output_embeddings() ({layer}) and the logit scalings its "
                       "config names (an encoder-style LM head transforms the hidden states first)")
        return (f"{name} cannot take prompts: softprompt's logits differ from the model's own by {errors[best]:.2g} "
                f"(relative) on a few token ids: {'; '.join(why) or 'its forward does something softprompt does not'}")

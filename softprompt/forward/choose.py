"""Choosing a model's family: once per loaded model, or from a config before loading; public dispatchers."""

from __future__ import annotations

import weakref

import torch

from softprompt.forward.causal import CausalLM
from softprompt.forward.classifier import EncoderClassifier
from softprompt.forward.common import RowSampling
from softprompt.forward.family import Family, FamilyError, InferencePrompt
from softprompt.forward.prompt import PromptOutput
from softprompt.forward.seq2seq import Seq2SeqLM

CAUSAL_LM, SEQ2SEQ_LM, SEQ_CLS = CausalLM(), Seq2SeqLM(), EncoderClassifier()
FAMILIES: dict[str, Family] = {f.name: f for f in (CAUSAL_LM, SEQ2SEQ_LM, SEQ_CLS)}
TASK_TYPES = ("auto", *FAMILIES)  # what --task-type takes
CAUSAL_HEADS = ("ForCausalLM", "LMHeadModel")

_CHOSEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def family_of(model) -> Family:
    """The family of a loaded model, decided on first use from its class and config and remembered.

    A ``*ForSequenceClassification`` model is an encoder classifier (its prompts train with a head, not
    label words); otherwise an encoder-decoder config (``is_encoder_decoder``) is a seq2seq LM; anything
    else is a causal LM.
    """
    try:
        family = _CHOSEN.get(model)
    except TypeError:  # not weak-referenceable (not an nn.Module): decided again on every call
        return _decide(model)
    if family is None:
        family = _CHOSEN[model] = _decide(model)
    return family


def _decide(model) -> Family:
    if type(model).__name__.endswith("ForSequenceClassification"):
        return SEQ_CLS
    if getattr(model.config, "is_encoder_decoder", False):
        return SEQ2SEQ_LM
    return CAUSAL_LM


def position_offset(config) -> int:
    """How many position ids a model of ``config`` skips before its first token: RoBERTa-style embeddings
    (RoBERTa, XLM-R, CamemBERT, Data2Vec-text...) number positions from ``pad_token_id + 1``, so their
    ``max_position_embeddings`` of 514 hold 512 tokens. Read from the architecture's embeddings code (a
    ``create_position_ids_from_inputs_embeds`` there), not from a list of names; 0 for every other model."""
    import importlib

    from transformers import MODEL_MAPPING

    try:
        module = importlib.import_module(MODEL_MAPPING[type(config)].__module__)
    except (KeyError, ValueError, ImportError):
        return 0
    pad = getattr(config, "pad_token_id", None)
    skips = any(isinstance(v, type) and hasattr(v, "create_position_ids_from_inputs_embeds")
                for v in vars(module).values())
    return pad + 1 if skips and isinstance(pad, int) and not isinstance(pad, bool) and pad >= 0 else 0


def family_for_config(config, requested: str = "auto") -> Family:
    """The family a checkpoint with ``config`` is loaded as (``--task-type``); refuses impossible combinations.

    ``auto`` picks ``seq2seq_lm`` for encoder-decoders, ``seq_cls`` for encoder families (BERT, RoBERTa, ...)
    unless the checkpoint records a causal-LM architecture (``BertLMHeadModel``, ``*ForCausalLM``), and
    ``causal_lm`` otherwise.

    Raises:
        FamilyError: an unknown type, or one the architecture cannot take.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if requested not in TASK_TYPES:
        raise FamilyError(f"--task-type {requested!r} is not one of {', '.join(TASK_TYPES)}")
    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    encoder = config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not seq2seq
    if requested == "auto":
        archs = getattr(config, "architectures", None) or []
        if seq2seq:
            return SEQ2SEQ_LM
        causal = any(a.endswith(CAUSAL_HEADS) for a in archs)  # e.g. BertLMHeadModel, RobertaForCausalLM
        return SEQ_CLS if encoder and not causal else CAUSAL_LM
    if requested == SEQ_CLS.name and not encoder:
        raise FamilyError(f"--task-type seq_cls takes an encoder model (BERT, RoBERTa, DeBERTa, ...); "
                             f"{config.model_type!r} is not one: decoder-only models classify through their LM "
                             "head with a --verbalizer (--task-type causal_lm)")
    if requested == SEQ2SEQ_LM.name and not seq2seq:
        raise FamilyError(f"--task-type seq2seq_lm takes an encoder-decoder (T5 family); {config.model_type!r} "
                             "is not one")
    if requested == CAUSAL_LM.name and seq2seq:
        raise FamilyError(f"{config.model_type!r} is an encoder-decoder: use --task-type seq2seq_lm (or auto)")
    return FAMILIES[requested]


def task_type_for_stored(peft_task_type: str | None) -> str:
    """The ``--task-type`` to load a base model with for a prompt stored with PEFT ``task_type``.

    A prompt with its own head needs the model loaded as that head's family; anything else loads ``auto``.
    """
    for family in FAMILIES.values():
        if family.has_head and family.peft_task_type == peft_task_type:
            return family.name
    return "auto"


def task_type_problem(model, peft_task_type) -> str | None:
    """Why a prompt stored with PEFT ``task_type`` cannot run on ``model``, or None: the task type of another of
    these families than the model's (a T5 prompt, read as an encoder's input, on a decoder-only model of the same
    width). A folder without one (PEFT may leave it null) or with a PEFT type no family has is not refused here."""
    others = {f.peft_task_type: f for f in FAMILIES.values()}
    family = family_of(model)
    if not isinstance(peft_task_type, str) or peft_task_type not in others or peft_task_type == family.peft_task_type:
        return None
    return (f"task_type {peft_task_type!r} (a prompt for {others[peft_task_type].description}) but the model "
            f"({type(model).__name__}) is {family.description} (task_type {family.peft_task_type!r})")


def trails_source(peft_task_type: str | None) -> bool:
    """Whether a prompt stored with PEFT ``task_type`` reads sources that end with a special token (an
    encoder-decoder's ``</s>``): what its stored layout flag says (``StoredPrompt.bos``)."""
    return any(family.trails_source and family.peft_task_type == peft_task_type for family in FAMILIES.values())


def compute_prompt_kv(model, prompt: PromptOutput | torch.Tensor | None) -> InferencePrompt:
    """A prompt prepared once for inference on ``model`` (:meth:`Family.inference_prompt`).

    On a causal LM: its keys/values (:class:`PromptKV`); on a seq2seq LM: its ``(P, H)`` embeddings; on an
    encoder classifier: the checked :class:`PromptOutput` with its head. Gradients flow through the result
    when the prompt requires grad; call under ``torch.no_grad()`` for inference.
    """
    return family_of(model).inference_prompt(model, prompt)


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_kv, max_new_tokens: int,
             eos_token_id: int | None, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             generator: torch.Generator | None = None) -> list[list[int]]:
    """Decode every row with the same settings; greedy when ``temperature == 0``.

    Returns the new token ids of each row, without the EOS token.
    """
    rows = [RowSampling(max_new_tokens, temperature, top_k, top_p, generator)] * input_ids.shape[0]
    return family_of(model).decode(model, input_ids, attention_mask, prompt_kv, rows, eos_token_id).tokens

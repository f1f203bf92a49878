"""Encoder sequence classifiers (BERT, RoBERTa, DeBERTa, ...): a prompt plus its own trained head per task.

As PEFT does for ``SEQ_CLS``: the prompt embeddings are prepended to the (right-padded) input embeddings and
the model's own embedding layer adds positions from 0, so the pooled first position is the first virtual
token. The encoder attends in both directions, so there are no prompt keys/values to cache: a prompt stays
a :class:`PromptOutput` (embeddings, or none, and the head). The prompt's head tensors replace the model's
head for each call only (``torch.func.functional_call``), so every task brings its own head and label count
to the same frozen model. Rows are tokenised with the encoder's own special tokens (``[CLS] ... [SEP]``).
"""

from __future__ import annotations

import inspect
import logging
import weakref

import torch
import torch.nn.functional as F

from softprompt.data import encode_classes
from softprompt.forward.common import InjectionError, by_length, check_pass, check_prompt, probe_ids
from softprompt.forward.family import Family, FamilyError
from softprompt.forward.head import evaluating
from softprompt.forward.prompt import PromptOutput

log = logging.getLogger(__name__)

HEAD_CHILDREN = ("classifier", "score")  # the head child of *ForSequenceClassification (PEFT's SEQ_CLS names)


def head_child(model) -> str:
    """Name of the model's classification head child (``classifier`` or ``score``)."""
    for name, _ in model.named_children():
        if name in HEAD_CHILDREN:
            return name
    raise ValueError(f"{type(model).__name__} has no classification head child named {' or '.join(HEAD_CHILDREN)}")


def record_untrained(model, missing: set[str]) -> None:
    """Remember which of ``model``'s parameters outside its head the checkpoint lacked (``missing``: what
    transformers reports missing or mismatched at load): a layer between the encoder and the head (DeBERTa's
    ``pooler.dense``, DistilBERT's ``pre_classifier``, BERT's pooler in a checkpoint saved without it) that
    transformers initialises at random at every load. Such weights train and store with the head
    (:func:`untrained_weights`), so that a prompt serves in another process as it was trained.

    Raises:
        ValueError: the checkpoint lacks the input embeddings (it is not a checkpoint of this architecture).
    """
    params = [n for n, _ in model.named_parameters()]
    head = head_child(model) + "."
    untrained = tuple(n for n in params if n in missing and not n.startswith(head))
    emb = model.get_input_embeddings().weight
    if any(p is emb for n, p in model.named_parameters() if n in untrained):
        raise ValueError(f"the checkpoint has no input embeddings for {type(model).__name__} (it lacks "
                         f"{len(untrained)} weights of {len(params)}): it is not a checkpoint of this architecture")
    if untrained:
        log.info("the checkpoint lacks %s: trained and stored with the classification head", ", ".join(untrained))
    model._softprompt_untrained = untrained


def untrained_weights(model) -> tuple[str, ...]:
    """Parameters outside the head that the checkpoint lacked at load (:func:`record_untrained`), in the model's
    order; none for a model that did not come from :meth:`EncoderClassifier.from_pretrained`."""
    return tuple(getattr(model, "_softprompt_untrained", ()))


def extra_inputs(model, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inputs a classifier derives from ``input_ids`` when it is not given them, passed explicitly with
    ``inputs_embeds``: Longformer's ``global_attention_mask`` (global attention on the first position, the one
    its head pools, as it sets on ids)."""
    if "global_attention_mask" not in inspect.signature(model.forward).parameters:
        return {}
    first = torch.zeros_like(mask)
    first[:, 0] = 1
    return {"global_attention_mask": first}


_READS_EMBEDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def check_reads_embeds(model) -> None:
    """Refuse a classifier that computes something else from ``inputs_embeds`` than from the same text's ids:
    ESM's embeddings layer (token-dropout rescaling, positions, layer norm) runs on ids only, so a prompt and
    the text after it would go in without it. Compared once per model, with no prompt, on ordinary ids.

    Raises:
        InjectionError: the two differ, or the model takes no ``inputs_embeds`` (Perceiver).
    """
    if model in _READS_EMBEDS:
        return
    with evaluating(model):  # no dropout in the comparison, no gradients, not beside a running batch
        ids = probe_ids(model)  # (1, 3)
        mask = torch.ones_like(ids)

        def last_hidden(**inputs) -> torch.Tensor:
            out = model(**inputs, attention_mask=mask, **extra_inputs(model, mask), output_hidden_states=True)
            states = getattr(out, "hidden_states", None)
            return (states[-1][:, :ids.shape[1]] if states else out.logits).float()

        try:
            want = last_hidden(input_ids=ids)
            got = last_hidden(inputs_embeds=model.get_input_embeddings()(ids))
        except Exception as e:  # noqa: BLE001 - whatever a model without an embeddings path raises
            raise InjectionError(f"{type(model).__name__} cannot take a prompt in front of its input: its forward "
                                 f"on its embedding module's output fails ({type(e).__name__}: {e})") from None
    if got.shape != want.shape or not torch.allclose(got, want, atol=1e-4, rtol=1e-3):
        raise InjectionError(f"{type(model).__name__} computes something else from token ids than from its embedding "
                             "module's output (ESM: its embeddings layer, with token-dropout rescaling, positions "
                             "and layer norm, runs on ids only): a prompt cannot be put in front of its input here")
    _READS_EMBEDS[model] = True


def classifier_prompt(model, prompt: PromptOutput | torch.Tensor | None) -> PromptOutput:
    """A sequence classifier's prompt: embeddings (or none) and its head, checked against the model."""
    if isinstance(prompt, torch.Tensor):
        prompt = PromptOutput(embeds=prompt)
    if prompt is None:
        return PromptOutput()
    if prompt.kv is not None:
        raise InjectionError(f"{type(model).__name__} is an encoder sequence classifier: a key/value prefix "
                             "needs a decoder's cache; use a prompt of embeddings (prompt_tuning, p_tuning)")
    if prompt.embeds is not None:
        check_prompt(model, prompt.embeds)
    return prompt


def class_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 prompt: PromptOutput | torch.Tensor | None) -> torch.Tensor:
    """Class logits ``(B, C)`` of a sequence classifier with the prompt in front of every row's input."""
    check_reads_embeds(model)
    prompt = classifier_prompt(model, prompt)
    text = model.get_input_embeddings()(input_ids)  # (B, T, H)
    mask = attention_mask
    if prompt.embeds is not None:
        b, p = input_ids.shape[0], prompt.embeds.shape[0]
        text = torch.cat([prompt.embeds.to(text)[None].expand(b, -1, -1), text], dim=1)  # (B, P+T, H)
        mask = torch.cat([torch.ones(b, p, dtype=mask.dtype, device=mask.device), mask], dim=1)
    from softprompt.forward.choose import position_offset  # it imports this module

    limit = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    limit -= position_offset(model.config) if limit else 0  # RoBERTa: 514 positions hold 512 tokens
    if limit and text.shape[1] > limit:
        raise InjectionError(f"prompt + input is {text.shape[1]} tokens, more than the model's "
                             f"{limit} positions: lower --max-length or --num-virtual-tokens")
    params = prompt.head.overrides(text) if prompt.head is not None else {}
    out = torch.func.functional_call(model, params, (), {"inputs_embeds": text, "attention_mask": mask,
                                                          **extra_inputs(model, mask)})
    return out.logits.float()


def target_loss(model, batch, prompt: PromptOutput | torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy of the class logits against ``batch.class_labels``."""
    if batch.class_labels is None:
        raise InjectionError("a sequence classifier trains on class labels: encode the examples with "
                             "encode_classes")
    return F.cross_entropy(class_logits(model, batch.input_ids, batch.attention_mask, prompt), batch.class_labels)


@torch.no_grad()
def class_scores(model, tokenizer, prompt, examples, fmt, batch_size: int, max_length: int = 256) -> torch.Tensor:
    """Log-softmax of the class logits for every example: ``(N, num_labels)``.

    Rows are right-padded (an encoder's positions count from the first token, as in PEFT's ``SEQ_CLS``).

    Raises:
        ValueError: the prompt's head has another number of classes than the task has labels.
    """
    enc = encode_classes(tokenizer, examples, fmt.labels, max_length)
    scores = by_length(enc, batch_size, tokenizer.pad_token_id, "right",
                       lambda b: torch.log_softmax(class_logits(
                           model, b.input_ids.to(model.device), b.attention_mask.to(model.device), prompt), -1).cpu())
    if scores.shape[1] != len(fmt.labels):
        raise ValueError(f"the classifier head has {scores.shape[1]} classes, the task {len(fmt.labels)} labels")
    return scores


class EncoderClassifier(Family):
    """An encoder with a sequence-classification head (``*ForSequenceClassification``): prompt + head per task."""

    name = "seq_cls"
    peft_task_type = "SEQ_CLS"
    description = "an encoder sequence classifier"
    generates = False
    has_head = True

    def from_pretrained(self, name_or_path, dtype, num_labels=None):
        from transformers import AutoModelForSequenceClassification

        # the checkpoint's own head (if any) is not used: the prompt brings its trained head
        model, info = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, dtype=dtype, num_labels=num_labels or 2, ignore_mismatched_sizes=True,
            output_loading_info=True)
        try:
            record_untrained(model, set(info["missing_keys"]) | {k[0] for k in info["mismatched_keys"]})
        except ValueError as e:  # Perceiver's head is a decoder module: not one PEFT's SEQ_CLS trains either
            raise FamilyError(f"--task-type seq_cls: {e}") from None
        return model

    def check_model(self, model):
        try:
            check_reads_embeds(model)
        except InjectionError as e:
            raise FamilyError(f"--task-type seq_cls: {e}") from None

    def format_problem(self, model, fmt):
        problem = super().format_problem(model, fmt)  # --objective lm
        if problem:
            return problem
        if not fmt.is_classification:
            return f"{type(model).__name__} is a sequence classifier: the task needs labels (--verbalizer)"
        return None

    def encode_examples(self, tokenizer, examples, fmt, max_length, bos=True):
        return encode_classes(tokenizer, examples, fmt.labels, max_length)  # class indices, no target tokens

    def label_lengths(self, tokenizer, fmt):
        return [1] * len(fmt.labels)  # a head's "target" is one class

    def inference_prompt(self, model, prompt) -> PromptOutput:
        return classifier_prompt(model, prompt)

    def step_prompt(self, model, prompt, mode="auto") -> PromptOutput:
        check_pass(mode)
        return classifier_prompt(model, prompt)  # one pass: an encoder has no keys/values to share

    def loss(self, model, batch, prompt):
        return target_loss(model, batch, prompt)

    def target_logprobs(self, model, batch, prompt):
        raise InjectionError(f"{type(model).__name__} is a sequence classifier: it predicts classes, it has no "
                             "target tokens to score")

    def label_scores(self, model, tokenizer, prompt, examples, fmt, batch_size, max_length=256, bos=True):
        return class_scores(model, tokenizer, prompt, examples, fmt, batch_size, max_length)

    def decode(self, model, input_ids, attention_mask, prompt, rows, eos_token_id, should_stop=None):
        if len(rows) != input_ids.shape[0]:
            raise InjectionError(f"{len(rows)} sampling settings for a batch of {input_ids.shape[0]} rows")
        raise InjectionError(f"{type(model).__name__} is a sequence classifier: it predicts classes, it does not "
                             "generate text")

"""Use a stored soft prompt with vLLM, through its ``prompt_embeds`` input.

vLLM (``vllm serve MODEL --enable-prompt-embeds``) accepts a ``(sequence_length, hidden_size)`` tensor in
place of a prompt, base64-encoded ``torch.save`` bytes in the ``prompt_embeds`` field of a Completions
request. A soft prompt is exactly that: its ``P`` embeddings followed by the embeddings of the text's
tokens. Positions are ``0 .. P+T-1``, as softprompt uses them. Prefix methods have no embeddings (they act
on keys/values at every layer), so they cannot be sent this way.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import torch

from softprompt.data import with_leading
from softprompt.forward import family_of


class VllmExportError(ValueError):
    """The prompt cannot be expressed as vLLM prompt embeddings."""


@torch.no_grad()
def prompt_embeds(model, tokenizer, method, text: str, bos: bool = True) -> torch.Tensor:
    """``(P + T, H)`` embeddings of the soft prompt followed by ``text``'s tokens: after the model's BOS when
    ``bos`` (the layout the prompt was trained with: ``StoredPrompt.bos``), no other special tokens."""
    out = method.eval()()
    if out.embeds is None:
        raise VllmExportError(f"method {method.name!r} has no input embeddings (it prefixes keys/values at every "
                              "layer); vLLM's prompt_embeds input takes embedding-space prompts only "
                              "(prompt_tuning, p_tuning)")
    if out.head is not None:
        raise VllmExportError(f"method {method.name!r} carries a sequence-classification head: it classifies with an "
                              "encoder, while vLLM's prompt_embeds input feeds a generating model")
    family = family_of(model)
    if not family.served:  # T5: the prompt precedes the encoder input, closed by </s>; vLLM's input is a decoder's
        raise VllmExportError(f"{type(model).__name__} is {family.description}: vLLM's prompt_embeds input feeds a "
                              "decoder-only model's sequence")
    lead = family.lead_ids(tokenizer, bos)
    ids = with_leading(tokenizer(text, add_special_tokens=False)["input_ids"], lead)
    table = model.get_input_embeddings()
    tokens = table(torch.tensor(ids, dtype=torch.long, device=table.weight.device))  # (T, H); T may be 0
    return torch.cat([out.embeds.to(tokens), tokens]).float().cpu()  # (P+T, H)


def served_weights(name_or_path: str) -> str:
    """What ``vllm serve`` must be given to run the weights :func:`softprompt.model.load_base_model` loads for
    ``name_or_path``: the prompt was trained on those, and its embeddings steer no other weights.

    An embedded alias or a ``.gguf`` file is loaded from the safetensors folder it was de-quantised into (fp32,
    in softprompt's cache; made here when missing): that folder, not the hub checkpoint the GGUF was quantised
    from, is the model to serve. A hub id or a model folder is served as it is.
    """
    from softprompt.model import ALIASES, materialize_alias, materialize_gguf

    if name_or_path in ALIASES:
        return str(materialize_alias(name_or_path))
    if name_or_path.endswith(".gguf"):
        return str(materialize_gguf(Path(name_or_path)))
    return name_or_path


def request_text(stored, tokenizer, user_input: str) -> tuple[str, bool]:
    """The text to embed after ``stored``'s prompt for ``user_input``, and whether a BOS goes before it: what
    the prompt was trained on. A chat task's input is one user turn of a conversation rendered with its chat
    template and the generation prompt, with no BOS added (the template writes its own); a template task's
    input fills its one field (``StoredPrompt.bos``); a prompt without a template takes the text as it is.

    Raises:
        VllmExportError: a template of several fields (give the filled text instead).
    """
    from softprompt.data.chat import ChatFormat, conversation_prompt
    from softprompt.data.template import template_fields

    record = stored.task_record
    if record is not None and record.chat:
        fmt = ChatFormat(chat_template=record.chat_template)
        return conversation_prompt(tokenizer, fmt, [{"role": "user", "content": user_input}]), False
    template = record.template if record is not None else None
    if not template:
        return user_input, stored.bos
    fields = template_fields(template)
    if len(fields) != 1:
        raise VllmExportError(f"the prompt's template {template!r} has fields {fields}: fill it yourself and send "
                              "the whole text")
    return template.format_map({fields[0]: user_input}), stored.bos


def encode(embeds: torch.Tensor) -> str:
    """Base64 of the ``torch.save`` bytes: the string vLLM's ``prompt_embeds`` field takes."""
    buf = io.BytesIO()
    torch.save(embeds.contiguous(), buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode(data: str) -> torch.Tensor:
    """Inverse of :func:`encode` (tensors only: ``weights_only``)."""
    return torch.load(io.BytesIO(base64.b64decode(data)), weights_only=True)

"""The space a soft prompt lives in: the output of the model's input-embedding module.

A prompt of embeddings is prepended to the text's ``inputs_embeds``, and those are what
``model.get_input_embeddings()(input_ids)`` returns, not the raw rows of its weight matrix. Some families
scale in that module (Gemma 1-3 multiply the rows by ``sqrt(hidden_size)``: 25.3 at hidden 640), so every
init and every comparison with vocabulary tokens goes through the module here, never through ``.weight``.
Models that scale ``inputs_embeds`` inside their forward (Granite's ``embedding_multiplier``) scale the
prompt and the text alike, so the module's output is the right space for them too. PEFT uses the same
space: its TEXT and SAMPLE_VOCAB inits call the module, and it concatenates its prompt to the module's
output of the text.
"""

from __future__ import annotations

import torch

CHUNK_ROWS = 8192  # vocabulary rows embedded per step: a (8192, H) block instead of (V, H) at once

__all__ = ["embedding_rms", "token_embeddings", "vocab_embeddings"]


@torch.no_grad()
def token_embeddings(model, ids: list[int] | torch.Tensor) -> torch.Tensor:
    """What the model consumes for ``ids``: the embedding module's output, fp32 on the CPU, ``(N, H)``."""
    module = model.get_input_embeddings()
    ids = torch.as_tensor(ids, dtype=torch.long, device=module.weight.device)
    return module(ids).float().cpu()


@torch.no_grad()
def vocab_embeddings(model, rows: int | None = None, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """The embedding module's output for token ids ``0..rows-1`` (default: all rows), ``(rows, H)``.

    Kept on the model's device and in its dtype (one extra copy of the embedding matrix), computed
    ``chunk_rows`` ids at a time.
    """
    module = model.get_input_embeddings()
    rows = int(module.weight.shape[0]) if rows is None else rows
    dev = module.weight.device
    return torch.cat([module(torch.arange(s, min(s + chunk_rows, rows), device=dev))
                      for s in range(0, rows, chunk_rows)])


@torch.no_grad()
def embedding_rms(model, rows: int | None = None, chunk_rows: int = CHUNK_ROWS) -> float:
    """Root-mean-square of the embedding module's output over token ids ``0..rows-1`` (default: all).

    All rows by default, padding rows beyond the tokenizer included, so the value depends on the model
    alone (a few padding rows move it by a fraction of a percent). It is the unit of the ``random`` init:
    ``init_scale`` is measured in it, so a random prompt has the same size relative to the text on every
    family (0.1356 on SmolLM2-135M, whose module returns the raw rows).
    """
    module = model.get_input_embeddings()
    rows = int(module.weight.shape[0]) if rows is None else rows
    dev = module.weight.device
    total, count = 0.0, 0
    for s in range(0, rows, chunk_rows):
        out = module(torch.arange(s, min(s + chunk_rows, rows), device=dev)).double()  # (C, H)
        total += float(out.pow(2).sum())
        count += out.numel()
    return (total / count) ** 0.5 if count else 0.0

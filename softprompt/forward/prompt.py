"""What a prompt method hands to the forward pass (the methods build it; this package consumes it)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PromptOutput:
    """What a method contributes to the forward pass; :mod:`softprompt.forward` consumes it.

    At most one of ``embeds`` and ``kv`` is set (neither: no prompt, e.g. a head evaluated alone).

    Attributes:
        embeds: ``(P, H)`` virtual-token embeddings prepended to the input (prompt tuning, P-tuning).
        kv: per-layer ``(keys, values)``, each ``(1, kv_heads, P, head_dim)``, that the text attends to at
            every layer (prefix tuning, deep prompts).
        length: ``P`` when ``kv`` is given.
        head: for a sequence-classification model, the trained head's tensors by model parameter name
            (:class:`~softprompt.methods.head.ClassificationHead`), used in place of the model's own.
    """

    embeds: torch.Tensor | None = None
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    length: int = 0
    head: ClassificationHead | None = None  # noqa: F821 (methods.head; forward does not import methods)

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.embeds.shape[0]) if self.embeds is not None else self.length

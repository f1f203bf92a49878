"""P-tuning (Liu et al. 2021): virtual-token embeddings produced by a prompt encoder (MLP or LSTM).

During training a small encoder maps ``P`` trainable input vectors to the ``(P, H)`` prompt, which couples
the virtual tokens and tends to train more stably than free embeddings. The encoder only shapes training:
:meth:`saved_tensors` stores its output, so a stored P-tuning prompt is a plain ``(P, H)`` embedding
(PEFT ``P_TUNING`` with ``inference_mode``, which PEFT loads the same way) and serves exactly like prompt
tuning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from softprompt.forward import text_config
from softprompt.methods.base import (
    MethodConfig,
    PromptMethod,
    PromptOutput,
    common_config_problems,
    peft_config_common,
    register_method,
    require_tensor,
)

ENCODERS = ("mlp", "lstm")


@dataclass
class PTuningConfig(MethodConfig):
    """Configuration of P-tuning.

    Attributes:
        num_virtual_tokens: ``P``.
        encoder: ``mlp`` (two layers, ReLU) or ``lstm`` (bidirectional LSTM, then an MLP).
        encoder_hidden_size: the encoder's width (0: the model's hidden size).
        init_scale: std of the encoder's trainable inputs.
    """

    method: ClassVar[str] = "p_tuning"
    num_virtual_tokens: int = 20
    encoder: str = "mlp"
    encoder_hidden_size: int = 0
    encoder_num_layers: int = 2
    init_scale: float = 0.02
    dropout: float = 0.0
    seed: int = 0

    def __post_init__(self):
        problems = common_config_problems(self)
        if self.encoder not in ENCODERS:
            problems.append(f"encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if self.encoder_hidden_size < 0 or self.encoder_num_layers < 1:
            problems.append("encoder_hidden_size must be >= 0 and encoder_num_layers >= 1")
        if problems:
            raise ValueError(f"{self.method} config: " + "; ".join(problems))


@register_method
class PTuning(PromptMethod):
    """A prompt encoder during training; its output ``(P, H)`` once stored."""

    name: ClassVar[str] = "p_tuning"
    config_class: ClassVar[type[MethodConfig]] = PTuningConfig
    peft_type: ClassVar[str] = "P_TUNING"

    def __init__(self, config: PTuningConfig, hidden_size: int, folded: torch.Tensor | None = None):
        super().__init__(config)
        self.hidden_size = hidden_size
        self.dropout = nn.Dropout(config.dropout)
        if folded is not None:  # loaded from the store: the encoder's output, nothing else
            if folded.shape != (config.num_virtual_tokens, hidden_size):
                raise ValueError(f"p_tuning prompt_embeddings has shape {tuple(folded.shape)}, expected "
                                 f"({config.num_virtual_tokens}, {hidden_size})")
            self.embeddings = nn.Parameter(folded.detach().float().clone())
            return
        gen = torch.Generator().manual_seed(config.seed)
        width = config.encoder_hidden_size or hidden_size
        torch.manual_seed(config.seed)  # the encoder's own layers
        self.inputs = nn.Parameter(torch.randn(config.num_virtual_tokens, hidden_size, generator=gen)
                                   * config.init_scale)  # (P, H)
        if config.encoder == "lstm":
            self.lstm = nn.LSTM(hidden_size, width // 2 or 1, num_layers=config.encoder_num_layers,
                                bidirectional=True, batch_first=True)
            head_in = 2 * (width // 2 or 1)
        else:
            head_in = hidden_size
        self.head = nn.Sequential(nn.Linear(head_in, width), nn.ReLU(), nn.Linear(width, hidden_size))

    @classmethod
    def create(cls, config: PTuningConfig, model, tokenizer, **_ignored) -> PTuning:
        return cls(config, int(model.get_input_embeddings().weight.shape[1]))

    def _embeds(self) -> torch.Tensor:
        if hasattr(self, "embeddings"):
            return self.embeddings
        x = self.inputs
        if hasattr(self, "lstm"):
            x = self.lstm(x[None])[0][0]  # (P, 2 * width/2)
        return self.head(x)  # (P, H)

    def prompt(self) -> PromptOutput:
        return PromptOutput(embeds=self.dropout(self._embeds()))

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {"prompt_embeddings": self._embeds().detach().float().cpu().contiguous()}

    def peft_config(self, model) -> dict[str, Any]:
        cfg = text_config(model.config)  # a composite (vision-language) checkpoint's decoder
        return peft_config_common(
            model, self.peft_type, self.config.num_virtual_tokens, self.hidden_size,
            int(getattr(cfg, "num_attention_heads", 0) or 0),
            encoder_reparameterization_type="MLP" if self.config.encoder == "mlp" else "LSTM",
            encoder_hidden_size=self.config.encoder_hidden_size or self.hidden_size,
            encoder_num_layers=self.config.encoder_num_layers,
            encoder_dropout=0.0)  # inference_mode: PEFT reads prompt_embeddings directly, with no encoder

    @classmethod
    def from_saved(cls, config: PTuningConfig, tensors: dict[str, torch.Tensor]) -> PTuning:
        emb = require_tensor(cls.name, tensors)
        return cls(config, int(emb.shape[1]), folded=emb)

    @classmethod
    def config_from_peft(cls, peft_config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Prompt length from the tensor (PEFT stores the encoder's output, as we do) and the encoder kind."""
        return {"num_virtual_tokens": int(tensors["prompt_embeddings"].shape[0]),
                "encoder": "lstm" if peft_config.get("encoder_reparameterization_type") == "LSTM" else "mlp"}

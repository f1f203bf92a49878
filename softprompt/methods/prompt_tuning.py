"""Prompt tuning (Lester et al. 2021): ``P`` trainable virtual-token embeddings prepended to the input.

Every init lives in the space the model consumes: the output of its input-embedding module
(:mod:`softprompt.embeddings`), which is not the raw weight rows where the module scales them (Gemma).

Initialisations:
- ``random``: uniform in ``[-init_scale * rms, init_scale * rms]`` where ``rms`` is the root-mean-square of
  the embedding module's output over the vocabulary, so the prompt has the same size relative to the text
  on every family (the paper's 0.5 on a model whose embeddings have RMS 1 is ``init_scale`` 0.5 here);
- ``text``: embeddings of ``init_text``'s tokens, tiled or truncated to ``P``;
- ``sample_vocab``: embeddings of ``P`` distinct tokens drawn from the ``vocab_sample_size`` (5,000)
  most frequent tokens. "Frequent" is decided by counts of the tokens in the training data when the
  caller passes them (``token_counts``; the CLI does), topped up by token-id order otherwise: BPE and
  unigram vocabularies assign ids in the order merges/pieces were learned, which follows corpus frequency
  (the paper's T5 SentencePiece vocabulary is frequency-sorted the same way). Special tokens never count;
- ``class_labels``: the first slots take the (mean) embedding of each verbalizer label's tokens, the rest
  are sampled as in ``sample_vocab``.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from softprompt.embeddings import embedding_rms, token_embeddings
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

INITS = ("random", "text", "sample_vocab", "class_labels")


@dataclass
class PromptTuningConfig(MethodConfig):
    """Configuration of a prompt-tuning soft prompt.

    Attributes:
        num_virtual_tokens: prompt length ``P``.
        init: one of ``random``, ``text``, ``sample_vocab``, ``class_labels``.
        init_text: text for ``text`` init.
        init_scale: half-width of the uniform ``random`` init, in units of the RMS of the model's token
            embeddings (the embedding module's output).
        vocab_sample_size: how many of the most frequent tokens ``sample_vocab`` draws from.
        dropout: dropout on the prompt embeddings during training (one mask per step).
        seed: seed for the random parts of the initialisation.
    """

    method: ClassVar[str] = "prompt_tuning"
    num_virtual_tokens: int = 20
    init: str = "text"
    init_text: str = "Classify the sentiment of this movie review as positive or negative."
    init_scale: float = 0.5
    vocab_sample_size: int = 5000
    dropout: float = 0.0
    seed: int = 0

    def __post_init__(self):
        problems = common_config_problems(self, INITS)
        if not self.init_scale > 0:
            problems.append(f"--init-scale must be > 0, got {self.init_scale}")
        if self.vocab_sample_size < 1:
            problems.append(f"--vocab-sample-size must be >= 1, got {self.vocab_sample_size}")
        if problems:
            raise ValueError("; ".join(problems))


def frequent_token_ids(tokenizer, k: int, token_counts: Counter | None = None) -> list[int]:
    """The ``k`` most frequent non-special token ids (see the module docstring for "frequent")."""
    special = set(tokenizer.all_special_ids)
    special.update(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    ranked: list[int] = []
    if token_counts:
        ranked = [t for t, _ in sorted(token_counts.items(), key=lambda kv: (-kv[1], kv[0])) if t not in special]
    seen = set(ranked)
    for t in range(len(tokenizer)):
        if len(ranked) >= k:
            break
        if t not in special and t not in seen:
            ranked.append(t)
    return ranked[:k]


@register_method
class PromptTuning(PromptMethod):
    """Soft prompt of ``num_virtual_tokens`` embeddings, stored as ``prompt_embeddings`` ``(P, H)``."""

    name: ClassVar[str] = "prompt_tuning"
    config_class: ClassVar[type[MethodConfig]] = PromptTuningConfig
    peft_type: ClassVar[str] = "PROMPT_TUNING"

    def __init__(self, config: PromptTuningConfig, embeddings: torch.Tensor):
        super().__init__(config)
        # kept in fp32 whatever the model dtype: the update of a tiny parameter is cheap and bf16 would
        # swallow small Adafactor/AdamW steps; softprompt.forward casts to the model dtype.
        self.embeddings = nn.Parameter(embeddings.detach().to(torch.float32).clone())  # (P, H)
        self.dropout = nn.Dropout(config.dropout)

    @classmethod
    def create(cls, config: PromptTuningConfig, model, tokenizer, label_texts: list[str] | None = None,
               token_counts: Counter | None = None) -> PromptTuning:
        """Initialise in the space the model consumes (its embedding module's output) as ``config.init`` says."""
        p = config.num_virtual_tokens
        h = int(model.get_input_embeddings().weight.shape[1])
        gen = torch.Generator().manual_seed(config.seed)
        if config.init == "random":
            # in units of the embedding RMS: the same size relative to the text on every family
            rms = embedding_rms(model)
            emb = (torch.rand(p, h, generator=gen) * 2 - 1) * (config.init_scale * rms)
        elif config.init == "text":
            ids = tokenizer(config.init_text, add_special_tokens=False)["input_ids"]
            ids = (ids * (p // len(ids) + 1))[:p]  # tile, then truncate to P
            emb = token_embeddings(model, ids)  # (P, H)
        else:
            rows: list[torch.Tensor] = []
            if config.init == "class_labels":
                if not label_texts:
                    raise ValueError("--init class_labels needs a classification task with a --verbalizer")
                for text in label_texts[:p]:
                    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                    rows.append(token_embeddings(model, ids).mean(0))
            pool = frequent_token_ids(tokenizer, config.vocab_sample_size, token_counts)
            rng = random.Random(config.seed)
            need = p - len(rows)
            picks = rng.sample(pool, need) if need <= len(pool) else rng.choices(pool, k=need)
            if picks:
                rows.extend(token_embeddings(model, picks))
            emb = torch.stack(rows)  # (P, H)
        return cls(config, emb)

    def prompt(self) -> PromptOutput:
        return PromptOutput(embeds=self.dropout(self.embeddings))

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.embeddings.detach().cpu().contiguous()}

    def peft_config(self, model) -> dict[str, Any]:
        cfg = text_config(model.config)  # a composite (vision-language) checkpoint's decoder
        # prompt_tuning_init is written as RANDOM: PEFT re-runs the init when it builds the module (TEXT
        # would make it load a tokenizer from the hub) and then overwrites it with the stored weights.
        return peft_config_common(
            model, self.peft_type, self.config.num_virtual_tokens, int(self.embeddings.shape[1]),
            int(getattr(cfg, "num_attention_heads", 0) or 0), prompt_tuning_init="RANDOM",
            prompt_tuning_init_text=None, tokenizer_name_or_path=None, tokenizer_kwargs=None, auto_mapping=None)

    @classmethod
    def from_saved(cls, config: PromptTuningConfig, tensors: dict[str, torch.Tensor]) -> PromptTuning:
        emb = require_tensor(cls.name, tensors)
        if emb.ndim != 2 or emb.shape[0] != config.num_virtual_tokens:
            raise ValueError(f"prompt_embeddings has shape {tuple(emb.shape)}, expected "
                             f"({config.num_virtual_tokens}, hidden_size)")
        return cls(config, emb)

    @classmethod
    def config_from_peft(cls, peft_config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Prompt length from the tensor; PEFT's init is recorded where it is one of ours."""
        out: dict[str, Any] = {"num_virtual_tokens": int(tensors["prompt_embeddings"].shape[0])}
        text = peft_config.get("prompt_tuning_init_text")
        text = text if isinstance(text, str) else None  # a hand-edited list or number is not a text
        init = str(peft_config.get("prompt_tuning_init") or "random").lower()
        if init not in INITS or (init == "text" and not (text or "").strip()):
            init = "random"  # the tensors are what matters; init is only recorded
        out["init"] = init
        if isinstance(text, str) and text:
            out["init_text"] = text
        return out

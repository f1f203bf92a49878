"""Prefix tuning (Li & Liang 2021) and deep prompts (P-tuning v2, Liu et al. 2022).

Both learn ``P`` key/value vectors for every attention layer instead of input embeddings: the text attends
to them at every layer. ``prefix_tuning`` may reparameterise the prefix through an MLP during training
(``projection: true``, as in the paper); :meth:`saved_tensors` folds the MLP away and stores the prefix
itself. ``deep_prompt`` is the same module without the MLP (P-tuning v2 trains the per-layer prompts
directly).

Stored as PEFT ``PREFIX_TUNING``: ``prompt_embeddings`` of shape ``(P, num_layers * 2 * kv_dim)`` where
``kv_dim = kv_heads * head_dim``; for layer ``i`` the keys are slice ``2i`` and the values ``2i + 1``
(PEFT's layout, so PEFT loads it as is).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from softprompt.embeddings import token_embeddings
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

PREFIX_INITS = ("random", "text")


def kv_geometry(model) -> tuple[int, int, int]:
    """``(num_layers, kv_heads, head_dim)`` of a decoder's attention, from its (text) config.

    Raises:
        ValueError: the attention's shape differs by layer (Gemma 4's sliding and full layers have other head
            sizes): a prefix has one shape for every layer.
    """
    cfg = text_config(model.config)  # a composite (vision-language) checkpoint's decoder
    try:
        layers = int(getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "n_layer", 0))
        heads = int(getattr(cfg, "num_attention_heads", 0) or getattr(cfg, "n_head", 0))
        kv_heads = int(getattr(cfg, "num_key_value_heads", 0) or heads)
        # the attention's width, as PEFT reads it: OPT-350m's embeddings are narrower (word_embed_proj_dim) than it
        hidden = int(getattr(cfg, "hidden_size", 0) or model.get_input_embeddings().weight.shape[1])
        head_dim = int(getattr(cfg, "head_dim", 0) or hidden // heads)
    except RuntimeError as e:  # transformers refuses one value for an attribute that differs by layer
        shapes = _per_layer_shapes(cfg)
        raise ValueError("a key/value prefix has one shape for every layer, but the model's attention differs by "
                         "layer" + (f" (key/value heads x head size per layer: {shapes})" if shapes else f": {e}")
                         + "; use prompt_tuning or p_tuning") from None
    return layers, kv_heads, head_dim


def _per_layer_shapes(cfg) -> list[tuple[int, int]] | None:
    """``(kv_heads, head_dim)`` of each layer of a config whose attention differs by layer, if it says."""
    try:
        return [(int(c.num_key_value_heads), int(c.head_dim)) for c in cfg.per_layer_config]
    except (AttributeError, TypeError, ValueError, RuntimeError):
        return None


def kv_layout_problem(model, geometry: tuple[int, int, int]) -> str | None:
    """Why the model's attention cache does not hold keys/values of ``geometry``, or ``None`` when it does.

    A config can describe another cache than the model keeps: Falcon's multi-query attention (falcon-7b) caches
    one key/value head whatever ``num_kv_heads`` says, DeepSeek-V3's multi-head latent attention caches
    compressed latents (keys and values of other widths). One token runs through the frozen model and its
    cached keys and values are compared with ``(1, kv_heads, 1, head_dim)`` in every layer.
    """
    from softprompt.forward import InjectionError, compute_prompt_kv

    layers, kv_heads, head_dim = geometry
    try:
        with torch.no_grad():
            kv = compute_prompt_kv(model, token_embeddings(model, [0]))
    except InjectionError as e:
        return str(e)
    expected = (1, kv_heads, 1, head_dim)
    if len(kv.layers) != layers:
        return f"the model's attention cache has {len(kv.layers)} layers, but its config gives {layers}"
    for i, (k, v) in enumerate(kv.layers):
        if tuple(k.shape) != expected or tuple(v.shape) != expected:
            return (f"the model's attention caches keys {tuple(k.shape)} and values {tuple(v.shape)} for one token "
                    f"in layer {i}, but its config gives {expected} = (1, kv_heads, tokens, head_dim): a key/value "
                    "prefix cannot be laid out for it (multi-query or compressed-latent attention); use "
                    "prompt_tuning or p_tuning")
    return None


@dataclass
class PrefixTuningConfig(MethodConfig):
    """Configuration of prefix tuning.

    Attributes:
        num_virtual_tokens: prefix length ``P``.
        projection: train through an MLP (``P x H`` embedding -> hidden -> per-layer keys/values).
        encoder_hidden_size: the MLP's hidden width (0: the model's hidden size).
        init: ``random`` (normal, ``init_scale``) or ``text`` (the frozen model's own keys/values of
            ``init_text``, tiled to ``P``: the prefix starts as that hard prompt).
    """

    method: ClassVar[str] = "prefix_tuning"
    num_virtual_tokens: int = 20
    projection: bool = False
    encoder_hidden_size: int = 0
    init: str = "text"
    init_text: str = "Classify the sentiment of this movie review as positive or negative."
    init_scale: float = 0.02
    dropout: float = 0.0
    seed: int = 0
    num_layers: int = 0  # the model's attention geometry, filled in by create()
    kv_heads: int = 0
    head_dim: int = 0

    def __post_init__(self):
        problems = common_config_problems(self, PREFIX_INITS)
        if self.encoder_hidden_size < 0:
            problems.append(f"encoder_hidden_size must be >= 0, got {self.encoder_hidden_size}")
        if problems:
            raise ValueError(f"{self.method} config: " + "; ".join(problems))


@register_method
class PrefixTuning(PromptMethod):
    """Per-layer key/value prefixes, optionally produced by an MLP during training."""

    name: ClassVar[str] = "prefix_tuning"
    injects: ClassVar[str] = "kv"
    config_class: ClassVar[type[MethodConfig]] = PrefixTuningConfig
    peft_type: ClassVar[str] = "PREFIX_TUNING"
    peft_token_dim_meaning: ClassVar[str] = "key/value width (kv_heads x head_dim)"

    def __init__(self, config: PrefixTuningConfig, geometry: tuple[int, int, int], prefix: torch.Tensor,
                 hidden_size: int = 0):
        super().__init__(config)
        self.geometry = geometry
        layers, kv_heads, head_dim = geometry
        width = layers * 2 * kv_heads * head_dim
        if prefix.shape != (config.num_virtual_tokens, width):
            raise ValueError(f"{self.name} prefix has shape {tuple(prefix.shape)}, expected "
                             f"({config.num_virtual_tokens}, {width}) = (P, layers*2*kv_heads*head_dim)")
        self.dropout = nn.Dropout(config.dropout)
        if config.projection and hidden_size:
            # trainable input embeddings through an MLP; the last layer starts at zero with the initial
            # prefix as its bias, so training starts exactly from the initial prefix
            enc = config.encoder_hidden_size or hidden_size
            gen = torch.Generator().manual_seed(config.seed)
            self.embedding = nn.Parameter(torch.randn(config.num_virtual_tokens, hidden_size, generator=gen) * 0.02)
            # the MLP's layers draw their init from the global RNG: seeded, as p_tuning's encoder, so that the same
            # config builds the same MLP whatever ran before (a tune trial, reproduced later by train)
            torch.manual_seed(config.seed)
            self.mlp = nn.Sequential(nn.Linear(hidden_size, enc), nn.Tanh(), nn.Linear(enc, width))
            with torch.no_grad():
                self.mlp[2].weight.zero_()
                self.mlp[2].bias.copy_(prefix.float().mean(0))
            self.prefix_offset = nn.Parameter(prefix.detach().float() - prefix.float().mean(0))
        else:
            self.prefix = nn.Parameter(prefix.detach().to(torch.float32).clone())  # (P, L*2*kv_dim)

    @classmethod
    def create(cls, config: PrefixTuningConfig, model, tokenizer, **_ignored) -> PrefixTuning:
        """Initialise randomly or from the frozen model's keys/values of ``init_text``."""
        from softprompt.forward import compute_prompt_kv, local_window

        geometry = kv_geometry(model)
        problem = kv_layout_problem(model, geometry)
        if problem:
            raise ValueError(f"--method {cls.name}: {problem}")
        layers, kv_heads, head_dim = geometry
        config.num_layers, config.kv_heads, config.head_dim = geometry
        p = config.num_virtual_tokens
        if config.init == "random":
            gen = torch.Generator().manual_seed(config.seed)
            prefix = torch.randn(p, layers * 2 * kv_heads * head_dim, generator=gen) * config.init_scale
        else:
            window = local_window(text_config(model.config))  # the window's own size, in positions
            if window is not None and p >= window:  # the reshape below failed with a width error
                raise ValueError(f"--method {cls.name} --init text starts the prefix as the model's own keys/values "
                                 f"of the init text, but the model keeps only the last {window - 1} positions' "
                                 f"keys/values in its sliding-window layers (window {window}): with "
                                 f"--num-virtual-tokens {p} use --init random, or --num-virtual-tokens {window - 1} "
                                 "or fewer")
            ids = tokenizer(config.init_text, add_special_tokens=False)["input_ids"]
            ids = (ids * (p // len(ids) + 1))[:p]
            emb = token_embeddings(model, ids)  # (P, H) as the model consumes them (scaled on Gemma)
            with torch.no_grad():
                kv = compute_prompt_kv(model, emb)  # (1, kv_heads, P, head_dim) per layer
            kept = [int(k.shape[2]) for k, _ in kv.layers]
            if any(n != p for n in kept):
                raise ValueError(f"--method {cls.name} --init text: the model kept {kept} positions' keys/values per "
                                 f"layer of the {p}-token init text; use --init random")
            parts = []
            for k, v in kv.layers:
                parts += [k[0].permute(1, 0, 2).reshape(p, -1), v[0].permute(1, 0, 2).reshape(p, -1)]
            prefix = torch.cat(parts, dim=1).float().cpu()  # (P, L*2*kv_dim)
        hidden = int(model.get_input_embeddings().weight.shape[1])
        return cls(config, geometry, prefix, hidden_size=hidden)

    def _prefix(self) -> torch.Tensor:
        if hasattr(self, "mlp"):
            return self.mlp(self.embedding) + self.prefix_offset  # (P, L*2*kv_dim)
        return self.prefix

    def prompt(self) -> PromptOutput:
        layers, kv_heads, head_dim = self.geometry
        p = self.config.num_virtual_tokens
        flat = self.dropout(self._prefix()).view(p, layers * 2, kv_heads, head_dim).permute(1, 2, 0, 3)
        kv = [(flat[2 * i][None], flat[2 * i + 1][None]) for i in range(layers)]  # (1, kv_heads, P, d) each
        return PromptOutput(embeds=None, kv=kv, length=p)

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():  # the MLP, if any, is folded into the prefix it produces
            return {"prompt_embeddings": self._prefix().detach().float().cpu().contiguous()}

    def peft_config(self, model) -> dict[str, Any]:
        layers, kv_heads, head_dim = self.geometry
        return peft_config_common(model, self.peft_type, self.config.num_virtual_tokens, kv_heads * head_dim,
                                  kv_heads, encoder_hidden_size=kv_heads * head_dim,
                                  prefix_projection=False)  # any MLP was folded at save time

    @classmethod
    def from_saved(cls, config: PrefixTuningConfig, tensors: dict[str, torch.Tensor]) -> PrefixTuning:
        require_tensor(cls.name, tensors)
        geometry = (config.num_layers, config.kv_heads, config.head_dim)
        if min(geometry) < 1:
            raise ValueError(f"{cls.name} config lacks the model geometry (num_layers, kv_heads, head_dim): "
                             f"{geometry}")
        folded = type(config).from_dict({**config.to_dict(), "projection": False})
        out = cls(folded, geometry, tensors["prompt_embeddings"])  # the MLP was folded away at save time
        out.config = config
        return out

    @classmethod
    def peft_tensor_shapes(cls, peft_config: dict[str, Any]) -> dict[str, tuple[int, int]]:
        """``prompt_embeddings`` ``(P, num_layers * 2 * token_dim)``: keys and values of every layer."""
        return {"prompt_embeddings": (peft_config["num_virtual_tokens"],
                                      int(peft_config.get("num_layers") or 0) * 2 * peft_config["token_dim"])}

    @classmethod
    def peft_config_problems(cls, peft_config: dict[str, Any]) -> list[str]:
        layers = peft_config.get("num_layers")
        if isinstance(layers, int) and not isinstance(layers, bool) and layers >= 1:
            return []
        return [f"'num_layers' must be a positive integer, got {layers!r}"]

    @classmethod
    def config_from_peft(cls, peft_config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Prompt length from the tensor and the attention geometry from ``adapter_config``.

        PEFT writes the prefix itself even when it trained through a projection MLP
        (``prefix_projection``): its ``save_pretrained`` stores the MLP's output as ``prompt_embeddings``.
        """
        heads = int(peft_config.get("num_attention_heads") or 0)
        return {"num_virtual_tokens": int(tensors["prompt_embeddings"].shape[0]), "init": "random",
                "num_layers": int(peft_config.get("num_layers") or 0), "kv_heads": heads,
                "head_dim": peft_config["token_dim"] // heads if heads else 0}

    @classmethod
    def peft_token_dim(cls, model) -> int:
        """A prefix's ``token_dim`` is the model's key/value width, ``kv_heads * head_dim``."""
        _, kv_heads, head_dim = kv_geometry(model)
        return kv_heads * head_dim

    @classmethod
    def peft_model_mismatch(cls, peft_config: dict[str, Any], model,
                            method_config: dict[str, Any] | None = None) -> str | None:
        """``num_layers``, and the attention layout the keys/values are cut into (layers, key/value heads, head
        size: from ``method_config``, which ``num_attention_heads`` fills for a PEFT folder), against the
        model's: a prefix of the right total width cut into other heads fails in the model's cache."""
        geometry = kv_geometry(model)
        layers = peft_config.get("num_layers")
        if layers != geometry[0]:
            return f"num_layers {layers} but the model has {geometry[0]}; the prefix cannot work with it"
        stored = tuple((method_config or {}).get(k) for k in ("num_layers", "kv_heads", "head_dim"))
        if any(v is not None for v in stored):  # a config without the layout is refused when it is built
            if stored != geometry:
                return (f"a prefix cut into (layers, key/value heads, head size) {stored} but the model's "
                        f"attention has {geometry}; the prefix cannot work with it")
        return None


@dataclass
class DeepPromptConfig(PrefixTuningConfig):
    """Deep prompts (P-tuning v2): trainable prompts at every layer, no reparameterisation."""

    method: ClassVar[str] = "deep_prompt"

    def __post_init__(self):
        super().__post_init__()
        if self.projection:
            raise ValueError("deep_prompt config: projection is not used (use prefix_tuning for an MLP)")


@register_method
class DeepPrompt(PrefixTuning):
    """Stored exactly like prefix tuning (PEFT ``PREFIX_TUNING``); a plain PEFT prefix folder reads as prefix_tuning."""

    name: ClassVar[str] = "deep_prompt"
    config_class: ClassVar[type[MethodConfig]] = DeepPromptConfig
    reads_peft_folders: ClassVar[bool] = False

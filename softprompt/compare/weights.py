"""Weight-tuning baselines of the comparison: LoRA (PEFT), Houlsby adapters, BitFit, full fine-tuning.

Each is wrapped as a "method" whose parameters live inside (or are hooked into) the model and whose prompt is
empty, so it trains with the same loop as the prompt methods.

Bottleneck adapters: AdapterHub's ``adapters`` package (1.3.0) pins ``transformers~=4.57`` and PEFT 0.21 has
no bottleneck adapter, so :class:`HoulsbyAdapter` is implemented here. As in Houlsby et al. (2019), each
decoder layer gets two: one on the attention block's output and one on the MLP block's output, each applied
before that output is added to the residual stream: ``h + up(gelu(down(h)))`` with ``down: H -> m`` and
``up: m -> H``. They are attached with forward hooks on the layer's attention and MLP modules (a public
PyTorch API; transformers is not edited). ``up`` starts at zero, so the model starts exactly as it was (the
paper draws both projections from N(0, 1e-2) for a near-identity start); ``down`` keeps nn.Linear's default
init, so ``up`` gets a gradient from the first step. Unlike the paper, the layer norms stay frozen: the row
trains the adapters alone.

BitFit trains the bias vectors. On a model without biases (Llama, SmolLM2, ...) it trains the norm layers'
gains instead and the row says so ("BitFit (norm gains; model has no biases)"): the closest per-channel
parameters such a model has.
"""

from __future__ import annotations

import torch
from torch import nn

from softprompt.compare.specs import Spec
from softprompt.forward import family_of
from softprompt.methods.base import PromptOutput
from softprompt.methods.head import ClassificationHead

ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
# LoRA's default targets (Hu et al.: the query and value projections) under the names families give them, matched
# as a module's whole last name: Llama/Qwen/Gemma, BERT/RoBERTa, DeBERTa-v2, DistilBERT, T5, GPT-2, Phi-3,
# GPT-NeoX/Falcon/Bloom, MPT/ModernBERT (a suffix match took Phi-3's qkv_proj for a v_proj, and PEFT then found
# no target; the encoders' names matched nothing)
LORA_TARGETS = (("q_proj", "v_proj"), ("query", "value"), ("query_proj", "value_proj"), ("q_lin", "v_lin"),
                ("q", "v"), ("c_attn",), ("qkv_proj",), ("query_key_value",), ("Wqkv",))


def lora_targets(model, config: dict) -> list[str]:
    """The module names a LoRA row adapts: ``config["target_modules"]`` when given, else the first group of
    :data:`LORA_TARGETS` the model has.

    Raises:
        ValueError: none of them is in the model (the message lists its linear layers' names).
    """
    if config.get("target_modules"):
        return list(config["target_modules"])
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    for group in LORA_TARGETS:
        if all(g in names for g in group):
            return list(group)
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    raise ValueError(f"LoRA: {type(model).__name__} has none of the attention projections LoRA adapts by default "
                     f"({', '.join('/'.join(g) for g in LORA_TARGETS)}); its linear layers are named "
                     f"{', '.join(linear) or 'nothing'}: give the row's config target_modules")
MLP_NAMES = ("mlp", "feed_forward", "ffn")


class WeightTuning(nn.Module):
    """Trains parameters inside the model (or hooked into it); no prompt. Fits the train loop's method interface.

    Attributes:
        label: the row's label when the model decides the variant (BitFit), else ``None``.
    """

    name = "weights"

    def __init__(self, model, trainable: dict[str, nn.Parameter], owned: nn.Module | None = None,
                 label: str | None = None):
        super().__init__()
        self._model = [model]  # not a submodule: state_dict holds only the trainable tensors
        self._names = list(trainable)
        self.params = nn.ParameterList(trainable.values())
        self.owned = owned  # modules that exist only for this method (adapters): moved and switched with it
        self.label = label

    def forward(self) -> PromptOutput:
        return PromptOutput()

    def state_dict(self, *args, **kwargs):
        return {n: p.detach() for n, p in zip(self._names, self.params, strict=True)}

    def load_state_dict(self, state, strict: bool = True):
        with torch.no_grad():
            for n, p in zip(self._names, self.params, strict=True):
                p.copy_(state[n])

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.params)


class HoulsbyAdapter(nn.Module):
    """``h + up(gelu(down(h)))``: a bottleneck of width ``size`` on a hidden state of width ``hidden``."""

    def __init__(self, hidden: int, size: int):
        super().__init__()
        self.down = nn.Linear(hidden, size)
        self.up = nn.Linear(size, hidden)
        nn.init.zeros_(self.up.weight)  # identity at the start; down's output still gives up a gradient
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T, H)
        return h + self.up(nn.functional.gelu(self.down(h)))


def decoder_layers(model) -> nn.ModuleList:
    """The model's stack of ``config.num_hidden_layers`` blocks (the first ModuleList of that length)."""
    n = model.config.num_hidden_layers
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"no list of {n} layers (config.num_hidden_layers) in {type(model).__name__}")


def _child(layer: nn.Module, names: tuple[str, ...], what: str) -> nn.Module:
    for name in names:
        if isinstance(getattr(layer, name, None), nn.Module):
            return getattr(layer, name)
    have = [n for n, _ in layer.named_children()]
    raise ValueError(f"{type(layer).__name__} has no {what} module named one of {list(names)} (has {have})")


def _hook(adapter: HoulsbyAdapter):
    def apply(module, args, output):
        if isinstance(output, tuple):  # attention: (hidden states, attention weights, ...)
            return (adapter(output[0]), *output[1:])
        return adapter(output)
    return apply


def add_adapters(model, size: int) -> tuple[nn.ModuleDict, list]:
    """Hook a :class:`HoulsbyAdapter` onto every decoder layer's attention and MLP outputs.

    Returns:
        The adapters (keys ``"{layer}_attn"``, ``"{layer}_mlp"``) and the hook handles.
    """
    hidden = model.config.hidden_size
    ref = next(model.parameters())
    adapters, handles = nn.ModuleDict(), []
    for i, layer in enumerate(decoder_layers(model)):
        for part, names in (("attn", ATTENTION_NAMES), ("mlp", MLP_NAMES)):
            adapter = HoulsbyAdapter(hidden, size).to(device=ref.device, dtype=ref.dtype)
            adapters[f"{i}_{part}"] = adapter
            handles.append(_child(layer, names, part).register_forward_hook(_hook(adapter)))
    return adapters, handles


def weight_method(model, spec: Spec, seed: int = 0) -> WeightTuning:
    """Unfreeze (or add, for LoRA and adapters) the parameters ``spec`` trains.

    On a sequence classifier (an encoder: no language-model head) every row also trains the classification
    head, from the init a prompt row's head gets with ``seed`` (:meth:`ClassificationHead.create`): the head
    the model loaded with is random and frozen, and LoRA, adapter and BitFit rows trained under it while the
    prompt rows trained their own.

    Raises:
        ValueError: an unknown kind, or a model without parameters of that kind.
    """
    kind, config = spec.kind, spec.config
    owned, variant = None, None
    if kind == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        targets = lora_targets(model, config)
        inject_adapter_in_model(LoraConfig(r=config.get("r", 8), lora_alpha=config.get("alpha", 16),
                                           target_modules=targets, lora_dropout=0.0), model)
        chosen = {n: p for n, p in model.named_parameters() if "lora_" in n}
    elif kind == "adapter":
        owned, _ = add_adapters(model, config.get("size", 8))
        chosen = {f"adapters.{n}": p for n, p in owned.named_parameters()}
    elif kind == "bitfit":
        chosen = {n: p for n, p in model.named_parameters() if n.endswith(".bias")}
        variant = "BitFit (biases)"
        if not chosen:
            chosen = {f"{n}.weight": m.weight for n, m in model.named_modules()
                      if "norm" in type(m).__name__.lower() and isinstance(getattr(m, "weight", None), nn.Parameter)}
            variant = "BitFit (norm gains; model has no biases)"
    elif kind == "full":
        chosen = dict(model.named_parameters())
    else:
        raise ValueError(f"unknown comparison kind {kind!r}")
    if not chosen:
        raise ValueError(f"{spec.label}: this model has no parameters of that kind")
    if family_of(model).has_head:  # the row's own head, as a prompt row's (full fine-tuning: already chosen)
        head = ClassificationHead.create(model, seed)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, t in zip(head.names, head.tensors, strict=True):
                params[name].copy_(t.to(params[name]))
                chosen.setdefault(name, params[name])
    for p in chosen.values():
        p.requires_grad_(True)
    return WeightTuning(model, chosen, owned, variant)

"""The method protocol and registry shared by every prompt-learning method."""

from __future__ import annotations

import math
import typing
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, ClassVar

import torch
from torch import nn

from softprompt.forward.prompt import PromptOutput
from softprompt.methods.head import ClassificationHead, is_head_key


@dataclass
class MethodConfig:
    """Base for method configs: plain, JSON-serialisable fields."""

    method: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every field's default: what the method trains with when a field is not given (the CLI's defaults)."""
        return {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(cls)
                if f.default is not MISSING or f.default_factory is not MISSING}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{cls.method} config: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)


def _type_problem(name: str, value: Any, typ: Any) -> str | None:
    """Why ``value`` is not of the field type ``typ`` (bool, int, float, str), or ``None``."""
    if typ is bool:
        ok = isinstance(value, bool)
    elif typ is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif typ is float:  # an int is a fine float (JSON writes 0.0 back as 0 in some tools)
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    elif typ is str:
        ok = isinstance(value, str)
    else:
        return None
    return None if ok else f"{name} must be {'a finite ' if typ is float else 'a '}{typ.__name__}, got {value!r}"


def check_field_types(cfg) -> None:
    """Raise ValueError naming every field of a method config whose value has the wrong type.

    Configs are also read from stored, untrusted ``softprompt.json`` files: a ``null`` dropout or a string
    prompt length must be a message naming the field, not a TypeError in a later comparison.
    """
    hints = typing.get_type_hints(type(cfg))
    problems = [p for f in fields(cfg) if (p := _type_problem(f.name, getattr(cfg, f.name), hints.get(f.name)))]
    if problems:
        raise ValueError(f"{cfg.method} config: " + "; ".join(problems))


def common_config_problems(cfg, inits: tuple[str, ...] = ()) -> list[str]:
    """Checks every method config shares: prompt length, dropout, and (for methods with ``inits``) the init.

    Raises:
        ValueError: a field has the wrong type (see :func:`check_field_types`); the value checks here and
            in each config's ``__post_init__`` then compare values of the right types only.
    """
    check_field_types(cfg)
    problems = []
    if not isinstance(cfg.num_virtual_tokens, int) or cfg.num_virtual_tokens < 1:
        problems.append(f"--num-virtual-tokens must be >= 1, got {cfg.num_virtual_tokens!r}")
    if inits:
        if cfg.init not in inits:
            problems.append(f"--init must be one of {', '.join(inits)}, got {cfg.init!r}")
        if cfg.init == "text" and not (cfg.init_text or "").strip():
            problems.append("--init text needs a non-empty --init-text")
    if not 0.0 <= cfg.dropout < 1.0:
        problems.append(f"--prompt-dropout must be in [0, 1), got {cfg.dropout}")
    return problems


class PromptMethod(nn.Module):
    """Protocol of a prompt-learning method.

    Subclasses set ``name``, ``config_class`` and ``injects`` (``embeds`` or ``kv``: what their prompt is),
    hold only trainable parameters, and implement:
    - ``prompt() -> PromptOutput``: the prompt for one training step / inference;
    - ``saved_tensors() -> dict[str, Tensor]``: what goes into ``adapter_model.safetensors``;
    - ``peft_config(model) -> dict``: PEFT-compatible ``adapter_config.json`` content;
    - ``from_saved(config, tensors) -> PromptMethod`` (classmethod): rebuild for inference.

    Each method also owns its mapping to PEFT's on-disk format, which :mod:`softprompt.store.format` asks
    for through :func:`method_for_peft_type` instead of knowing any method:
    - ``peft_type``: the ``adapter_config.json`` ``peft_type`` it is stored as; ``reads_peft_folders``:
      whether a plain PEFT folder of that type is read as this method (one method per type);
    - ``peft_tensor_shapes(peft_config)``: the tensors and shapes a valid ``adapter_config`` implies;
    - ``peft_config_problems(peft_config)``: type-specific ``adapter_config`` fields that are unusable;
    - ``config_from_peft(peft_config, tensors)``: our config dict for a folder written by PEFT;
    - ``peft_token_dim(model)`` / ``peft_token_dim_meaning``: the ``token_dim`` the model needs, and what it is;
    - ``peft_model_mismatch(peft_config, model, method_config)``: anything else in ``adapter_config`` or the
      stored method config that the model lacks.
    The defaults fit a prompt of ``(P, H)`` input embeddings stored as ``prompt_embeddings``.

    Calling the module (``forward``) returns ``prompt()`` plus the classification head when one is attached
    (:meth:`attach_head`; encoder sequence classification). The head's tensors train, checkpoint and
    store with the prompt's (:meth:`stored_tensors`).
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    injects: ClassVar[str] = "embeds"
    peft_type: ClassVar[str] = ""
    reads_peft_folders: ClassVar[bool] = True
    peft_token_dim_meaning: ClassVar[str] = "hidden size"  # what token_dim is, for error messages

    def __init__(self, config: MethodConfig):
        super().__init__()
        self.config = config
        self.classifier: ClassificationHead | None = None

    def prompt(self) -> PromptOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self) -> PromptOutput:
        out = self.prompt()
        out.head = self.classifier
        return out

    @classmethod
    def check_takes_head(cls) -> None:
        """Raise ValueError unless this method's prompt can go in front of an encoder classifier's input."""
        if cls.injects != "embeds":
            raise ValueError(f"--method {cls.name} puts keys/values into a decoder's attention cache; encoder "
                             "sequence classifiers take a prompt of embeddings: use prompt_tuning or p_tuning")

    def attach_head(self, head: ClassificationHead) -> PromptMethod:
        """Train/serve this prompt with a sequence-classification head (prompt-embedding methods only)."""
        self.check_takes_head()
        self.classifier = head
        return self

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """``saved_tensors()`` plus the head's tensors under PEFT's keys, if a head is attached."""
        return {**self.saved_tensors(), **(self.classifier.saved_tensors() if self.classifier is not None else {})}

    def saved_config_problems(self) -> list[str]:
        """Why the config this method is stored with would not read back as its own config, or none."""
        try:  # what loading the stored prompt does with it
            get_method(self.name).config_class.from_dict(self.config.to_dict())
        except (ValueError, TypeError, AttributeError) as e:
            return [f"its {self.name} config would not load back: {e}"]
        return []

    def saved_tensors(self) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def peft_config(self, model) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def from_saved(cls, config: MethodConfig, tensors: dict[str, torch.Tensor]) -> PromptMethod:
        raise NotImplementedError  # pragma: no cover - abstract

    @classmethod
    def peft_tensor_shapes(cls, peft_config: dict[str, Any]) -> dict[str, tuple[int, int]]:
        """``{key: (rows, cols)}`` of ``adapter_model.safetensors`` that a valid ``adapter_config`` implies.

        ``num_virtual_tokens`` and ``token_dim`` are positive integers by then, and so is every field
        :meth:`peft_config_problems` checks.
        """
        return {"prompt_embeddings": (peft_config["num_virtual_tokens"], peft_config["token_dim"])}

    @classmethod
    def peft_config_problems(cls, peft_config: dict[str, Any]) -> list[str]:
        """What is wrong with this type's own ``adapter_config`` fields (the shared ones are checked by the store)."""
        return []

    @classmethod
    def config_from_peft(cls, peft_config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Our config dict for a folder written by PEFT, from its validated ``adapter_config`` and tensors.

        Raises:
            ValueError, TypeError, KeyError: a field PEFT wrote is unusable (the store names the file).
        """
        raise NotImplementedError  # pragma: no cover - abstract

    @classmethod
    def peft_token_dim(cls, model) -> int:
        """The ``token_dim`` a stored prompt of this type needs to work with ``model``."""
        return int(model.get_input_embeddings().weight.shape[1])

    @classmethod
    def peft_model_mismatch(cls, peft_config: dict[str, Any], model,
                            method_config: dict[str, Any] | None = None) -> str | None:
        """What else in ``adapter_config`` (besides ``token_dim``) or in the stored ``method_config`` does not
        fit ``model``, or ``None``.

        The phrase completes "``adapter_config.json`` has ...", e.g. ``"num_layers 4 but the model has 2; ..."``.
        """
        return None

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def peft_config_common(model, peft_type: str, num_virtual_tokens: int, token_dim: int, num_attention_heads: int,
                       **specific: Any) -> dict[str, Any]:
    """The ``adapter_config.json`` fields every prompt-learning type shares, plus ``specific`` ones."""
    from softprompt.forward import family_of, text_config  # it imports this module

    cfg, text = model.config, text_config(model.config)  # a composite (vision-language) checkpoint: its decoder
    return {
        "peft_type": peft_type,
        "task_type": family_of(model).peft_task_type,
        "num_virtual_tokens": num_virtual_tokens,
        "token_dim": token_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": num_attention_heads,
        "num_layers": int(getattr(text, "num_hidden_layers", 0) or getattr(text, "num_layers", 0) or 0),
        "base_model_name_or_path": str(getattr(cfg, "_name_or_path", "") or ""),
        "revision": None,
        "inference_mode": True,
        "modules_to_save": None,
        **specific,
    }


def require_tensor(method: str, tensors: dict[str, torch.Tensor], key: str = "prompt_embeddings") -> torch.Tensor:
    """``tensors[key]``, or a ValueError naming the method and the keys found."""
    if key not in tensors:
        raise ValueError(f"{method} weights need key {key!r}, found {sorted(tensors)}")
    return tensors[key]


METHODS: dict[str, type[PromptMethod]] = {}
PEFT_TYPE_TO_METHOD: dict[str, str] = {}  # PEFT peft_type -> the method a plain PEFT folder of it is read as


def register_method(cls: type[PromptMethod]) -> type[PromptMethod]:
    """Class decorator adding a method to :data:`METHODS` under ``cls.name``.

    A method that ``reads_peft_folders`` is also entered in :data:`PEFT_TYPE_TO_METHOD` for its ``peft_type``.
    """
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.peft_type and cls.reads_peft_folders:
        reader = PEFT_TYPE_TO_METHOD.setdefault(cls.peft_type, cls.name)
        if reader != cls.name:
            raise ValueError(f"{cls.__name__}: plain PEFT {cls.peft_type} folders are already read as {reader!r}; "
                             "set reads_peft_folders = False")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[PromptMethod]:
    """The method class registered as ``name``."""
    if name not in METHODS:
        raise ValueError(f"--method {name!r} is not one of {sorted(METHODS)}")
    return METHODS[name]


def checkpointing_problem(name: str) -> str | None:
    """Why ``--method name`` cannot train with ``--gradient-checkpointing``, or ``None`` when it can.

    A key/value prefix lives in the attention cache, and transformers drops the cache inside a checkpointed
    decoder layer (``cache=None``): the layers would run without the prefix (PEFT refuses the combination too).
    """
    if get_method(name).injects != "kv":
        return None
    return (f"--method {name} cannot train with --gradient-checkpointing: its prefix is keys/values in every "
            "layer's attention cache, and transformers drops that cache inside a checkpointed layer; leave out "
            "--gradient-checkpointing (and train.gradient_checkpointing in --config), or use prompt_tuning or "
            "p_tuning")


def method_for_peft_type(peft_type: Any) -> type[PromptMethod]:
    """The method class a PEFT folder whose ``adapter_config.json`` has ``peft_type`` is read as.

    Raises:
        ValueError: ``peft_type`` is not one that a registered method reads (including a non-string value
            from an untrusted file), naming the supported ones.
    """
    if not isinstance(peft_type, str) or peft_type not in PEFT_TYPE_TO_METHOD:
        raise ValueError(f"unsupported peft_type {peft_type!r} (supported: {', '.join(sorted(PEFT_TYPE_TO_METHOD))})")
    return METHODS[PEFT_TYPE_TO_METHOD[peft_type]]


def methods_stored_as(peft_type: str) -> list[str]:
    """Names of every registered method stored as ``peft_type`` (e.g. ``prefix_tuning`` and ``deep_prompt``)."""
    return [name for name, cls in METHODS.items() if cls.peft_type == peft_type]


def build_method(name: str, config: MethodConfig | dict, model, tokenizer, **init_kwargs) -> PromptMethod:
    """Create a freshly initialised method for ``model``.

    Args:
        name: registered method name.
        config: the method's config object, or a dict of its fields.
        model: the frozen base model (embeddings are read for initialisation).
        tokenizer: its tokenizer (text/vocab initialisation).
        **init_kwargs: method-specific initialisation inputs (e.g. ``label_texts``, ``token_counts``).
    """
    cls = get_method(name)
    if isinstance(config, dict):
        config = cls.config_class.from_dict(config)
    elif type(config) is not cls.config_class:  # another method's config: saved with it, the prompt would not load
        of = getattr(config, "method", "")
        raise ValueError(f"build_method({name!r}): config is a {type(config).__name__}"
                         f"{f' (the {of} config)' if of else ''}; {name} takes a {cls.config_class.__name__} "
                         "or a dict of its fields")
    from softprompt.forward import family_of  # it imports this module

    family = family_of(model)
    classifier = family.has_head
    if classifier:  # before create: a prefix init would run the encoder as a decoder
        cls.check_takes_head()
    elif cls.injects == "kv" and not family.caches_prompt:  # an encoder-decoder: its text init ran the encoder
        raise ValueError(f"--method {name} puts keys/values into a decoder-only model's attention cache; "
                         f"{type(model).__name__} is {family.description}: use prompt_tuning or p_tuning")
    method = cls.create(config, model, tokenizer, **init_kwargs)
    if classifier:
        method.attach_head(ClassificationHead.create(model, seed=getattr(config, "seed", 0)))
    return method


def method_from_saved(name: str, config: dict, tensors: dict[str, torch.Tensor]) -> PromptMethod:
    """Rebuild a stored method from its config dict and tensors (head tensors, if any, become its head)."""
    cls = get_method(name)
    method = cls.from_saved(cls.config_class.from_dict(config),
                            {k: v for k, v in tensors.items() if not is_head_key(k)})
    if any(is_head_key(k) for k in tensors):
        method.attach_head(ClassificationHead.from_saved(tensors))
    return method

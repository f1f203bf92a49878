"""Typed arguments for every command, their validation, and YAML config files.

Each dataclass field is also a CLI flag (``num_virtual_tokens`` -> ``--num-virtual-tokens``) and a key in
a YAML config file, where fields are grouped by section (``model:``, ``data:``, ``prompt:``, ``train:``,
``eval:``). Precedence: defaults < YAML file < flags given on the command line. ``__post_init__`` checks
every field and reports all problems at once, each naming its flag.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from softprompt.model import DEFAULT_MODEL, TASK_TYPES

log = logging.getLogger(__name__)

MAX_SEED = 2**32 - 1  # what every seeded generator (torch, random, numpy) accepts
MIN_MAX_LENGTH = 8  # the smallest --max-length: room for a short source and its target


class ConfigError(ValueError):
    """Invalid arguments; the message names every offending flag or config key."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _raise(problems: list[str]) -> None:
    if problems:
        raise ConfigError("invalid arguments:\n  " + "\n  ".join(problems))


def check_real(name: str, value: float, ok: Callable[[float], bool], rule: str) -> str | None:
    """The problem with a float flag ``name`` (``--lr``), if any: it must be finite and satisfy ``ok``.

    NaN and infinities pass most comparisons the wrong way (``inf > 0``, ``not nan < 0``), so they are
    refused before the range is checked.
    """
    if not math.isfinite(value):
        return f"{name} must be a finite number, got {value}"
    return None if ok(value) else f"{name} must be {rule}, got {value}"


def check_seed(name: str, value: int) -> str | None:
    """The problem with a seed flag, if any: it must be in ``0..MAX_SEED``."""
    return None if 0 <= value <= MAX_SEED else f"{name} must be in 0..{MAX_SEED}, got {value}"


def check_folder_to_create(name: str, path: str | os.PathLike) -> str | None:
    """The problem with a flag naming a folder to create (or reuse), if any.

    Refused: the path exists and is not a folder; the nearest existing ancestor is a file; that
    ancestor (or the folder itself) is not writable.
    """
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            return f"{name} {path}: exists and is not a folder"
        return None if os.access(p, os.W_OK | os.X_OK) else f"{name} {path}: the folder is not writable"
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{name} {path}: {parent} is not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{name} {path}: cannot create it in {parent} (not writable)"
    return None


def check_file_to_write(name: str, path: str | os.PathLike) -> str | None:
    """The problem with a flag naming a file to write (its folder is created if missing), if any."""
    p = Path(path)
    if p.is_dir():
        return f"{name} {path}: is a folder"
    if p.exists():
        return None if os.access(p, os.W_OK) else f"{name} {path}: the file is not writable"
    return check_folder_to_create(name, p)  # the same checks of the folders above it


def _keep(problems: list[str], *found: str | None) -> None:
    problems.extend(p for p in found if p)


@dataclass
class ModelArgs:
    """Which frozen base model to load, and where."""

    model: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "auto"
    task_type: str = "auto"

    def __post_init__(self):
        problems = []
        if self.task_type not in TASK_TYPES:
            problems.append(f"--task-type must be one of {', '.join(TASK_TYPES)}, got {self.task_type!r}")
        if self.dtype not in ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"):
            problems.append(f"--dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if not (self.device in ("auto", "cpu", "mps") or self.device.startswith("cuda")):
            problems.append(f"--device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        _raise(problems)


@dataclass
class DataArgs:
    """The task: a built-in dataset or files, its template and verbalizer.

    With neither ``--dataset`` nor files, ``train`` uses ``rotten_tomatoes`` and ``eval`` the dataset the
    stored prompt was trained on.
    """

    dataset: str | None = None
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    template: str | None = None
    target_field: str | None = None
    verbalizer: str | None = None
    max_length: int = 256
    max_train_samples: int | None = None
    max_validation_samples: int | None = 300
    max_test_samples: int | None = None
    data_seed: int = 13

    def __post_init__(self):
        problems = []
        for name in ("train_file", "validation_file", "test_file"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                problems.append(f"{flag(name)} {path}: no such file")
        if self.max_length < MIN_MAX_LENGTH:
            problems.append(f"--max-length must be >= {MIN_MAX_LENGTH}, got {self.max_length}")
        for name in ("max_train_samples", "max_validation_samples", "max_test_samples"):
            v = getattr(self, name)
            if v is not None and v < 1:
                problems.append(f"{flag(name)} must be >= 1, got {v}")
        _keep(problems, check_seed("--data-seed", self.data_seed))
        _raise(problems)

    def uses_files(self) -> bool:
        return bool(self.train_file or self.validation_file or self.test_file)

    def max_samples(self) -> dict[str, int]:
        caps = {"train": self.max_train_samples, "validation": self.max_validation_samples,
                "test": self.max_test_samples}
        return {k: v for k, v in caps.items() if v is not None}


# PromptArgs fields that set a field of the method's config (flag -> config field); left unset, each takes the
# chosen method's own default (its config dataclass), so the CLI trains a method as the Python API does
METHOD_FIELDS = {"num_virtual_tokens": "num_virtual_tokens", "init": "init", "init_scale": "init_scale",
                 "vocab_sample_size": "vocab_sample_size", "prompt_dropout": "dropout", "projection": "projection",
                 "encoder": "encoder", "encoder_hidden_size": "encoder_hidden_size"}


@dataclass
class PromptArgs:
    """The prompt-learning method and its initialisation (unset: the method's own default)."""

    method: str = "prompt_tuning"
    num_virtual_tokens: int | None = None
    init: str | None = None
    init_text: str | None = None  # None: from the task (softprompt.data.init_text.default_init_text)
    init_scale: float | None = None
    vocab_sample_size: int | None = None
    prompt_dropout: float | None = None
    projection: bool | None = None
    encoder: str | None = None
    encoder_hidden_size: int | None = None

    def __post_init__(self):
        """Check the values given, then fill each unset field the method takes with the method's default.

        A field the method does not take stays ``None`` (``null`` in ``--print-config``); ``init_text`` stays
        ``None`` until the task is known.
        """
        from softprompt.methods import METHODS

        problems = []
        if self.method not in METHODS:
            problems.append(f"--method must be one of {sorted(METHODS)}, got {self.method!r}")
        if self.num_virtual_tokens is not None and self.num_virtual_tokens < 1:
            problems.append(f"--num-virtual-tokens must be >= 1, got {self.num_virtual_tokens}")
        if self.init is not None and self.init not in ("random", "text", "sample_vocab", "class_labels"):
            problems.append(f"--init must be random, text, sample_vocab or class_labels, got {self.init!r}")
        if self.init_text is not None and not self.init_text.strip():
            problems.append("--init-text must not be empty (leave it out to derive it from the task)")
        if self.vocab_sample_size is not None and self.vocab_sample_size < 1:
            problems.append(f"--vocab-sample-size must be >= 1, got {self.vocab_sample_size}")
        if self.encoder_hidden_size is not None and self.encoder_hidden_size < 0:
            problems.append(f"--encoder-hidden-size must be >= 0, got {self.encoder_hidden_size}")
        if self.init_scale is not None:
            _keep(problems, check_real("--init-scale", self.init_scale, lambda v: v > 0, "> 0"))
        if self.prompt_dropout is not None:
            _keep(problems, check_real("--prompt-dropout", self.prompt_dropout, lambda v: 0 <= v < 1, "in [0, 1)"))
        _raise(problems)
        defaults = METHODS[self.method].config_class.defaults()
        for name, config_field in METHOD_FIELDS.items():
            if getattr(self, name) is None and config_field in defaults:
                setattr(self, name, defaults[config_field])

    def method_config(self, seed: int) -> dict[str, Any]:
        """The flags the chosen method's config takes (others are left out), validated by that config."""
        from dataclasses import fields as dc_fields

        from softprompt.methods import get_method

        values = {config_field: getattr(self, name) for name, config_field in METHOD_FIELDS.items()}
        values.update(init_text=self.init_text, seed=seed)
        config_class = get_method(self.method).config_class
        known = {f.name for f in dc_fields(config_class)}
        cfg = {k: v for k, v in values.items() if k in known and v is not None}  # None: the method's default
        try:
            config_class.from_dict(cfg)
        except ValueError as e:
            raise ConfigError(f"--method {self.method}: {e}") from None
        return cfg


@dataclass
class TrainArgs:
    """The training loop."""

    output_dir: str = "runs/rotten_tomatoes"
    epochs: int = 1
    max_steps: int = 0
    batch_size: int = 16
    grad_accum: int = 1
    group_by_length: bool = True
    optimizer: str = "adafactor"
    lr: float = 0.3
    weight_decay: float = 1e-5
    warmup_steps: int = 10
    schedule: str = "linear"
    max_grad_norm: float = 1.0
    eval_every: int = 50
    early_stopping_patience: int = 0
    metric: str = "auto"
    checkpoint_every: int = 25
    resume: bool = False
    seed: int = 0
    prompt_pass: str = "auto"
    gradient_checkpointing: bool = False
    divergence_guard: bool = True
    max_rollbacks: int = 5
    spike_factor: float = 3.0

    def __post_init__(self):
        problems = []
        for name in ("epochs", "batch_size", "grad_accum", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                problems.append(f"{flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "early_stopping_patience", "max_rollbacks"):
            if getattr(self, name) < 0:
                problems.append(f"{flag(name)} must be >= 0, got {getattr(self, name)}")
        if self.optimizer not in ("adafactor", "adamw"):
            problems.append(f"--optimizer must be adafactor or adamw, got {self.optimizer!r}")
        if self.schedule not in ("linear", "cosine", "constant"):
            problems.append(f"--schedule must be linear, cosine or constant, got {self.schedule!r}")
        _keep(problems, check_real("--lr", self.lr, lambda v: v > 0, "> 0"),
              check_real("--weight-decay", self.weight_decay, lambda v: v >= 0, ">= 0"),
              check_real("--max-grad-norm", self.max_grad_norm, lambda v: v > 0, "> 0"),
              check_real("--spike-factor", self.spike_factor, lambda v: v > 1, "> 1"),
              check_seed("--seed", self.seed), check_folder_to_create("--output-dir", self.output_dir))
        if self.prompt_pass not in ("auto", "shared_kv", "concat"):
            problems.append(f"--prompt-pass must be auto, shared_kv or concat, got {self.prompt_pass!r}")
        if self.metric not in ("auto", "accuracy", "macro_f1", "exact_match", "f1", "loss"):
            problems.append(f"--metric must be auto, accuracy, macro_f1, exact_match, f1 or loss, "
                            f"got {self.metric!r}")
        _raise(problems)


@dataclass
class EvalArgs:
    """Evaluation and baselines."""

    split: str = "test"
    eval_batch_size: int = 32
    baselines: list[str] = field(default_factory=lambda: ["no_prompt", "hard_prompt", "k_shot"])
    k_shot: int = 4
    max_new_tokens: int = 16

    def __post_init__(self):
        problems = []
        known = ("no_prompt", "hard_prompt", "k_shot")
        bad = [b for b in self.baselines if b not in known]
        if bad:
            problems.append(f"--baselines: unknown {bad}; known: {', '.join(known)}")
        if self.split not in ("train", "validation", "test"):
            problems.append(f"--split must be train, validation or test, got {self.split!r}")
        for name in ("eval_batch_size", "k_shot", "max_new_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"{flag(name)} must be >= 1, got {getattr(self, name)}")
        _raise(problems)


@dataclass
class ServeArgs:
    """The HTTP server."""

    store: str | None = None
    tasks: list[str] = field(default_factory=list)
    base_task: str = "base"
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 1024
    max_tokens: int = 512
    admin_token: str | None = None
    admin_token_file: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    max_input_chars: int = 100_000

    def __post_init__(self):
        problems = []
        if self.admin_token and self.admin_token_file:
            problems.append("--admin-token and --admin-token-file both given: use one")
        if self.admin_token_file is not None and not Path(self.admin_token_file).is_file():
            problems.append(f"--admin-token-file {self.admin_token_file!r} is not a file")
        for name in ("max_batch_size", "max_queue", "max_tokens", "max_body_bytes", "max_input_chars"):
            if getattr(self, name) < 1:
                problems.append(f"{flag(name)} must be >= 1, got {getattr(self, name)}")
        _keep(problems, check_real("--max-wait-ms", self.max_wait_ms, lambda v: v >= 0, ">= 0"))
        if not 0 <= self.port <= 65535:
            problems.append(f"--port must be in 0..65535, got {self.port}")
        if self.store is None and not self.base_task:
            problems.append("nothing to serve: give --store DIR (or keep --base-task)")
        if self.tasks and self.store is None:
            problems.append("--tasks names tasks of a store: give --store DIR")
        _raise(problems)


SECTIONS: dict[str, type] = {"model": ModelArgs, "data": DataArgs, "prompt": PromptArgs, "train": TrainArgs,
                             "eval": EvalArgs, "serve": ServeArgs}


def field_type(cls: type, f: dataclasses.Field) -> type:
    """The scalar type behind a field annotation (``int | None`` -> ``int``, ``list[str]`` -> ``list``)."""
    hint = typing.get_type_hints(cls)[f.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def load_yaml(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a YAML config file into ``{section: {field: value}}``, rejecting unknown sections/keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not valid YAML ({e})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: top level must be a mapping of sections {sorted(SECTIONS)}")
    problems = []
    out: dict[str, dict[str, Any]] = {}
    for section, values in raw.items():
        if section not in SECTIONS:
            problems.append(f"{path}: unknown section {section!r} (known: {', '.join(SECTIONS)})")
            continue
        if not isinstance(values, dict):
            problems.append(f"{path}: section {section!r} must be a mapping")
            continue
        names = {f.name for f in dataclasses.fields(SECTIONS[section])}
        for key in values:
            if key not in names:
                problems.append(f"{path}: {section}.{key} is not a known field (known: {', '.join(sorted(names))})")
        out[section] = {k: v for k, v in values.items() if k in names}
    _raise(problems)
    return out


def build_args(cls: type, *layers: dict[str, Any], origins: Sequence[str | None] = ()) -> Any:
    """Instantiate ``cls`` from layered dicts (later wins), type-checking scalar values.

    Args:
        cls: a section dataclass.
        layers: field values, lowest precedence first; ``None`` values are ignored.
        origins: per layer, how its values are named in messages: a prefix such as ``"run.yaml: train."``
            (giving ``run.yaml: train.lr``), or ``None`` (or no entry) for the flag (``--lr``).

    Raises:
        ConfigError: every value of the wrong type, then every problem ``cls`` finds, each named after
            where the value came from.
    """
    merged: dict[str, Any] = {}
    source: dict[str, str | None] = {}
    for i, layer in enumerate(layers):
        for k, v in layer.items():
            if v is not None:
                merged[k], source[k] = v, origins[i] if i < len(origins) else None

    def name(field_name: str) -> str:
        prefix = source.get(field_name)
        return flag(field_name) if prefix is None else prefix + field_name

    problems = []
    for f in dataclasses.fields(cls):
        if f.name not in merged:
            continue
        want, value = field_type(cls, f), merged[f.name]
        if want is float and isinstance(value, int | str) and not isinstance(value, bool):
            try:  # YAML reads 3e-1 (no dot) as a string
                merged[f.name] = float(value)
            except ValueError:
                problems.append(f"{name(f.name)}: expected float, got {value!r}")
        elif want is list and isinstance(value, str):
            merged[f.name] = [v for v in value.split(",") if v]
        elif want is not typing.Any and not isinstance(value, want) or (want is int and isinstance(value, bool)):
            problems.append(f"{name(f.name)}: expected {want.__name__}, got {value!r}")
    typed = {k: v for k, v in merged.items() if not any(p.startswith(f"{name(k)}: expected") for p in problems)}
    try:  # the other values are still checked (ill-typed ones at their defaults), to report every problem
        args = cls(**typed)
    except ConfigError as e:
        lines = str(e).removeprefix("invalid arguments:\n  ").split("\n  ")
        problems += [_renamed(line, source) for line in lines]
    _raise(problems)
    return args


def _renamed(problem: str, source: dict[str, str | None]) -> str:
    """``problem`` (which starts with the flag it is about) naming the config key where that value came from."""
    m = re.match(r"--([a-z0-9-]+)(?![\w-])", problem)
    prefix = source.get(m.group(1).replace("-", "_")) if m else None
    return problem if prefix is None else prefix + m.group(1).replace("-", "_") + problem[m.end():]


def given(ns: Any, section: str, name: str) -> bool:
    """Whether field ``name`` was set by a flag or by the ``--config`` file, rather than left at its default."""
    if getattr(ns, name, None) is not None:
        return True
    config = getattr(ns, "config", None)
    return bool(config) and name in load_yaml(config).get(section, {})


def generate_flag_problems(max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                           seed: int) -> list[str]:
    """Every problem with the sampling flags of ``generate``, each naming its flag."""
    problems = [] if max_new_tokens >= 1 else [f"--max-new-tokens must be >= 1, got {max_new_tokens}"]
    if top_k < 0:
        problems.append(f"--top-k must be >= 0 (0: off), got {top_k}")
    _keep(problems, check_real("--temperature", temperature, lambda v: v >= 0, ">= 0 (0: greedy)"),
          check_real("--top-p", top_p, lambda v: 0 < v <= 1, "in (0, 1]"), check_seed("--seed", seed))
    return problems


def fit_max_length(context: tuple[int, str] | None, model: str, num_virtual_tokens: int, max_length: int,
                   given: bool) -> int:
    """The ``--max-length`` to train with, so that the prompt and every example fit the model's context.

    Args:
        context: the model's context length and the config key it comes from (see
            :func:`softprompt.model.context_length`), or ``None`` for a model without a hard limit.
        model: how to name the model in messages (``--model NAME``).
        num_virtual_tokens: the prompt length ``P``.
        max_length: the ``--max-length`` asked for or defaulted.
        given: whether the user set ``--max-length`` (then it is refused if it does not fit; a default is
            lowered to what fits instead).

    Raises:
        ConfigError: the prompt leaves fewer than ``MIN_MAX_LENGTH`` positions for text, or a given
            ``--max-length`` does not fit beside it.
    """
    if context is None:
        return max_length
    limit, key = context
    room = limit - num_virtual_tokens
    if room < MIN_MAX_LENGTH:
        left = f"only {room} are left" if room > 0 else "nothing is left"
        _raise([f"--num-virtual-tokens {num_virtual_tokens} does not fit {model}: its context is {limit} positions "
                f"({key}) and {left} for text; --num-virtual-tokens must be at most {limit - MIN_MAX_LENGTH} "
                f"(the text needs --max-length >= {MIN_MAX_LENGTH})"])
    if max_length <= room:
        return max_length
    if given:
        _raise([f"--num-virtual-tokens {num_virtual_tokens} + --max-length {max_length} = "
                f"{num_virtual_tokens + max_length} tokens do not fit {model}'s context of {limit} positions "
                f"({key}): {room} are left for text; lower --max-length to {room} or --num-virtual-tokens to "
                f"{limit - max_length}"])
    log.info("--max-length %d (default) lowered to --max-length %d: %s has %d positions (%s) and the prompt "
             "takes %d", max_length, room, model, limit, key, num_virtual_tokens)
    return room


def to_yaml(args: dict[str, Any]) -> str:
    """Write ``{section: dataclass instance}`` as a YAML config file text."""
    return yaml.safe_dump({k: dataclasses.asdict(v) for k, v in args.items()}, sort_keys=False)

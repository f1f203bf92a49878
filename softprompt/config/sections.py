"""The typed argument sections (``model:``, ``data:``, ``prompt:``, ``train:``, ``eval:``, ``serve:``).

Each dataclass field is also a CLI flag (``num_virtual_tokens`` -> ``--num-virtual-tokens``) and a key of
its section in a YAML config file. ``__post_init__`` checks every field and reports all problems at once,
each naming its flag.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from softprompt.config.checks import (
    MIN_MAX_LENGTH,
    ConfigError,
    admin_token_problem,
    check_folder_to_create,
    check_real,
    check_seed,
    flag,
    keep_problems,
    raise_problems,
)
from softprompt.config.typed import check_field_types
from softprompt.forward import TASK_TYPES
from softprompt.model import DEFAULT_MODEL

SCHEDULES = ("linear", "cosine", "constant", "wsd")  # the lr schedules of --schedule
HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")  # an HTTP header name (RFC 9110 token)
MAX_WAIT_MS = 60_000  # the scheduler's wait for company: beyond a minute it is a mistake (and past the OS's timeouts)


@dataclass
class ModelArgs:
    """Which frozen base model to load, and where."""

    model: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "auto"
    task_type: str = "auto"

    def __post_init__(self):
        check_field_types(self)  # before the checks below compare the values
        problems = []
        if self.task_type not in TASK_TYPES:
            problems.append(f"--task-type must be one of {', '.join(TASK_TYPES)}, got {self.task_type!r}")
        if self.dtype not in ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"):
            problems.append(f"--dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if not (self.device in ("auto", "cpu", "mps") or re.fullmatch(r"cuda(:\d+)?", self.device)):
            problems.append(f"--device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        raise_problems(problems)


@dataclass
class DataArgs:
    """The task: a built-in dataset or files, its template and verbalizer.

    With neither ``--dataset`` nor files, ``train`` uses ``rotten_tomatoes`` (``--objective lm``: the
    ``hamlet`` corpus) and ``eval`` the dataset the stored prompt was trained on.
    """

    dataset: str | None = None
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    template: str | None = None
    target_field: str | None = None
    verbalizer: str | dict | None = None  # "a=x,b=y", or in a config file a mapping (label: text)
    chat_template: str | None = None  # a Jinja chat template file for chat records (default: the model's)
    max_length: int = 256
    max_train_samples: int | None = None
    max_validation_samples: int | None = 300
    max_test_samples: int | None = None
    data_seed: int = 13
    objective: str = "task"  # "lm": plain text, every token a target (softprompt.data.corpus)
    text_field: str | None = None  # --objective lm: the text field of .jsonl/.csv corpora

    def __post_init__(self):
        check_field_types(self)  # before the checks below compare the values
        # an empty value (an unset shell variable: --verbalizer "$VERB") read as "not given": the stored or
        # built-in value took its place, and an empty verbalizer turned a classification task into generation
        empty = [name for name in ("dataset", "train_file", "validation_file", "test_file", "template", "target_field",
                                   "verbalizer", "chat_template", "text_field")
                 if isinstance(getattr(self, name), str) and not getattr(self, name).strip()]
        if empty:
            raise_problems([f"{flag(name)} is empty: give a value or leave the flag out" for name in empty])
        problems = objective_problems(self)
        for name in ("train_file", "validation_file", "test_file", "chat_template"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                problems.append(f"{flag(name)} {path}: no such file")
        if self.max_length < MIN_MAX_LENGTH:
            problems.append(f"--max-length must be >= {MIN_MAX_LENGTH}, got {self.max_length}")
        for name in ("max_train_samples", "max_validation_samples", "max_test_samples"):
            v = getattr(self, name)
            if v is not None and v < 0:
                problems.append(f"{flag(name)} must be >= 0 (0: the whole split), got {v}")
        keep_problems(problems, check_seed("--data-seed", self.data_seed))
        raise_problems(problems)

    def uses_files(self) -> bool:
        return bool(self.train_file or self.validation_file or self.test_file)

    def max_samples(self) -> dict[str, int]:
        caps = {"train": self.max_train_samples, "validation": self.max_validation_samples,
                "test": self.max_test_samples}
        # 0 lifts a cap: the validation split's default 300 could not be lifted (null keeps the default)
        return {k: v for k, v in caps.items() if v}


def objective_problems(data: DataArgs) -> list[str]:
    """Problems with ``--objective`` and the flags that depend on it (``--text-field``; the task flags)."""
    from softprompt.data.builtin import BUILTIN_DATASETS
    from softprompt.data.corpus import BUILTIN_CORPORA, OBJECTIVES, corpus_file_problem
    from softprompt.data.formats import SUPPORTED_SUFFIXES

    if data.objective not in OBJECTIVES:
        return [f"--objective must be one of {', '.join(OBJECTIVES)}, got {data.objective!r}"]
    if data.objective == "task":
        problems = [] if data.text_field is None else ["--text-field names the text of an --objective lm corpus; "
                                                       "a task uses --template and --target-field"]
        if data.dataset in BUILTIN_CORPORA:
            problems.append(f"--dataset {data.dataset} is a text corpus: add --objective lm")
        return problems
    problems = [f"{flag(name)} does not apply to --objective lm (plain text: every token is a target)"
                for name in ("template", "target_field", "verbalizer") if getattr(data, name) is not None]
    if data.dataset is not None and data.dataset not in BUILTIN_CORPORA:
        also = " (a task dataset: use --objective task)" if data.dataset in BUILTIN_DATASETS else ""
        problems.append(f"--objective lm: --dataset {data.dataset} is not a built-in text corpus{also}; known: "
                        f"{', '.join(BUILTIN_CORPORA)}")
    for name in ("train_file", "validation_file", "test_file"):
        path = getattr(data, name)
        if path and corpus_file_problem(path):
            problems.append(f"{flag(name)} {corpus_file_problem(path)}")
        elif path and Path(path).suffix.lower() in SUPPORTED_SUFFIXES and not data.text_field:
            problems.append(f"{flag(name)} {path} holds records: name the field with the text, --text-field FIELD")
    if data.text_field is not None and not data.text_field.strip():
        problems.append("--text-field must not be empty")
    return problems


# PromptArgs fields that set a field of the method's config (flag -> config field); left unset, each takes the
# chosen method's own default (its config dataclass), so the CLI trains a method as the Python API does
METHOD_FIELDS = {"num_virtual_tokens": "num_virtual_tokens", "init": "init", "init_scale": "init_scale",
                 "vocab_sample_size": "vocab_sample_size", "prompt_dropout": "dropout", "projection": "projection",
                 "encoder": "encoder", "encoder_hidden_size": "encoder_hidden_size"}


def method_default_help(name: str, default: Any) -> str:
    """The ``--help`` text of a prompt flag: a field filled from each method's own default names them all."""
    from softprompt.methods import METHODS

    if name not in METHOD_FIELDS:
        return f"default: {default!r}"
    per = {m: c.config_class.defaults()[METHOD_FIELDS[name]] for m, c in sorted(METHODS.items())
           if METHOD_FIELDS[name] in c.config_class.defaults()}
    return "default: the method's own (" + ", ".join(f"{m} {v!r}" for m, v in per.items()) + ")"


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
        check_field_types(self)  # before the checks below compare the values
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
            keep_problems(problems, check_real("--init-scale", self.init_scale, lambda v: v > 0, "> 0"))
        if self.prompt_dropout is not None:
            keep_problems(problems, check_real("--prompt-dropout", self.prompt_dropout, lambda v: 0 <= v < 1,
                                               "in [0, 1)"))
        raise_problems(problems)
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
    stop_when_flat: float = 0.0
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
        check_field_types(self)  # before the checks below compare the values
        problems = []
        for name in ("epochs", "batch_size", "grad_accum", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                problems.append(f"{flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "early_stopping_patience", "max_rollbacks"):
            if getattr(self, name) < 0:
                problems.append(f"{flag(name)} must be >= 0, got {getattr(self, name)}")
        if self.optimizer not in ("adafactor", "adamw"):
            problems.append(f"--optimizer must be adafactor or adamw, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            problems.append(f"--schedule must be {', '.join(SCHEDULES[:-1])} or {SCHEDULES[-1]}, "
                            f"got {self.schedule!r}")
        keep_problems(problems, check_real("--lr", self.lr, lambda v: v > 0, "> 0"),
              check_real("--weight-decay", self.weight_decay, lambda v: v >= 0, ">= 0"),
              check_real("--max-grad-norm", self.max_grad_norm, lambda v: v > 0, "> 0"),
              check_real("--spike-factor", self.spike_factor, lambda v: v > 1, "> 1"),
              check_real("--stop-when-flat", self.stop_when_flat, lambda v: 0 <= v < 1, "in [0, 1)"),
              check_seed("--seed", self.seed), check_folder_to_create("--output-dir", self.output_dir))
        if self.prompt_pass not in ("auto", "shared_kv", "concat"):
            problems.append(f"--prompt-pass must be auto, shared_kv or concat, got {self.prompt_pass!r}")
        if self.metric not in ("auto", "accuracy", "macro_f1", "exact_match", "f1", "loss"):
            problems.append(f"--metric must be auto, accuracy, macro_f1, exact_match, f1 or loss, "
                            f"got {self.metric!r}")
        raise_problems(problems)


@dataclass
class EvalArgs:
    """Evaluation and baselines."""

    split: str = "test"
    eval_batch_size: int = 32
    baselines: list[str] = field(default_factory=lambda: ["no_prompt", "hard_prompt", "k_shot"])
    k_shot: int = 4
    max_new_tokens: int = 16

    def __post_init__(self):
        check_field_types(self)  # before the checks below compare the values
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
        raise_problems(problems)


@dataclass
class ServeArgs:
    """The HTTP server."""

    store: str | None = None
    tasks: list[str] = field(default_factory=list)
    base_task: str = "base"
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_requests: int = 32  # requests the scheduler gathers into one engine call
    max_batch_rows: int = 32  # rows per forward (an ensemble or multi-token labels give a request several)
    max_wait_ms: float = 5.0
    max_queue: int = 1024
    max_queue_per_client: int = 0  # most requests of one client waiting; 0: only --max-queue
    client_header: str | None = None  # the request header naming the client (else: the peer address)
    max_tokens: int = 512
    # continuous: generations join and leave the running batch at every decode step; batch: batch-at-a-time
    scheduler: str = "continuous"
    prefill_chunk: int = 256  # most input tokens the running batch reads per step (continuous)
    admin_token: str | None = None
    admin_token_file: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    max_input_chars: int = 100_000

    def __post_init__(self):
        check_field_types(self)  # before the checks below compare the values
        problems = []
        if self.admin_token and self.admin_token_file:
            problems.append("--admin-token and --admin-token-file both given: use one")
        if self.admin_token_file is not None and not Path(self.admin_token_file).is_file():
            problems.append(f"--admin-token-file {self.admin_token_file!r} is not a file")
        if self.scheduler not in ("continuous", "batch"):
            problems.append(f"--scheduler must be continuous or batch, got {self.scheduler!r}")
        for name in ("max_batch_requests", "max_batch_rows", "max_queue", "max_tokens", "max_body_bytes",
                     "max_input_chars", "prefill_chunk"):
            if getattr(self, name) < 1:
                problems.append(f"{flag(name)} must be >= 1, got {getattr(self, name)}")
        keep_problems(problems, check_real("--max-wait-ms", self.max_wait_ms, lambda v: 0 <= v <= MAX_WAIT_MS,
                                           f"in [0, {MAX_WAIT_MS}] (a batch waits at most this long for company)"))
        if self.max_queue_per_client < 0:
            problems.append(f"--max-queue-per-client must be >= 0 (0: no share, only --max-queue), got "
                            f"{self.max_queue_per_client}")
        if self.client_header is not None and not HEADER_NAME.fullmatch(self.client_header):
            problems.append(f"--client-header must be an HTTP header name (letters, digits, '-', e.g. X-API-Key), "
                            f"got {self.client_header!r}")
        if not 0 <= self.port <= 65535:
            problems.append(f"--port must be in 0..65535, got {self.port}")
        if not self.host or any(c.isspace() for c in self.host):  # '' would listen on every interface
            problems.append(f"--host must be an address or host name (127.0.0.1, 0.0.0.0 for every interface), "
                            f"got {self.host!r}")
        if self.admin_token is not None:
            keep_problems(problems, admin_token_problem(self.admin_token, "--admin-token"))
        if self.store is None and not self.base_task:
            problems.append("nothing to serve: give --store DIR (or keep --base-task)")
        if self.tasks and self.store is None:
            problems.append("--tasks names tasks of a store: give --store DIR")
        raise_problems(problems)


SECTIONS: dict[str, type] = {"model": ModelArgs, "data": DataArgs, "prompt": PromptArgs, "train": TrainArgs,
                             "eval": EvalArgs, "serve": ServeArgs}

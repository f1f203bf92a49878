"""On-disk format of one stored prompt: a PEFT-compatible folder plus our metadata.

::

    <folder>/
      adapter_model.safetensors   the method's saved_tensors() (prompt tuning: prompt_embeddings (P, H)), and
                                  for a sequence classifier its head under PEFT's keys (base_model.classifier.*)
      adapter_config.json         PEFT's config: PeftModel.from_pretrained(base, folder) reads the folder
      softprompt.json             method + config, base-model fingerprint, task, training config, metrics,
                                  ``bos`` (the text after the prompt starts with the model's BOS)

A folder without ``softprompt.json`` is a plain PEFT folder; its ``peft_type`` is mapped to our method
by :func:`softprompt.methods.method_for_peft_type`; that method owns the mapping (expected tensors, config
fields, token_dim). Stored prompts are untrusted input: only safetensors is read (never pickle /
``torch.load``), and every config field and tensor is checked before a method is built from them.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from softprompt.forward import family_of, task_type_problem, trails_source
from softprompt.methods import PromptMethod, method_for_peft_type, method_from_saved, methods_stored_as
from softprompt.methods.head import HEAD_MODULE_NAMES, SAVED_PREFIX, head_problems, is_head_key, saved_by_peft
from softprompt.model import context_length, fingerprint, fingerprint_mismatch, fingerprint_problems
from softprompt.store.atomic import write_folder_atomically, write_json, write_safetensors
from softprompt.store.errors import StoreError
from softprompt.store.snapshot import MAX_JSON_BYTES, MAX_WEIGHTS_BYTES, parse_json, read_folder
from softprompt.store.task_record import TASK_KEYS, TaskRecord

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
META_NAME = "softprompt.json"
FORMAT_VERSION = 1
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

__all__ = ["CONFIG_NAME", "FORMAT_VERSION", "META_NAME", "WEIGHTS_NAME", "StoreError", "StoredPrompt",
           "check_model_compatible", "load_prompt", "save_prompt"]


@dataclass
class StoredPrompt:
    """A validated stored prompt.

    Attributes:
        path: the folder it was read from (``None`` when built in memory).
        method: our method name.
        method_config: the method's config dict.
        tensors: the safetensors content, e.g. ``{"prompt_embeddings": (P, H)}``.
        peft_config: ``adapter_config.json``.
        meta: ``softprompt.json`` (empty for plain PEFT folders).
        task_record: ``meta["task"]`` parsed and validated (``None`` when not recorded); every reader of
            the stored task uses it.

    Raises:
        StoreError: ``meta["task"]`` is malformed (naming ``softprompt.json`` and the field).
    """

    path: Path | None
    method: str
    method_config: dict
    tensors: dict[str, torch.Tensor]
    peft_config: dict
    meta: dict = field(default_factory=dict)
    task_record: TaskRecord | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        where = self.path / META_NAME if self.path is not None else "prompt"
        self.task_record = TaskRecord.parse(self.meta.get("task"), where)

    def build_method(self) -> PromptMethod:
        """A fresh method module holding the stored tensors, in eval mode (call ``.train()`` to tune on)."""
        return method_from_saved(self.method, dict(self.method_config), self.tensors).eval()

    @property
    def task(self) -> dict | None:
        """The recorded ``task`` object as stored (see :attr:`task_record` for the validated form)."""
        return self.meta.get("task")

    @property
    def bos(self) -> bool:
        """Whether the text after this prompt carries the tokenizer's own special tokens, as PEFT lays it out
        and as it was trained: a causal LM's BOS starting it (``[prompt, BOS, text]``), an encoder-decoder's
        ``</s>`` ending the source (``[prompt, src, </s>]``).

        ``softprompt.json`` records it (``"specials"``; ``"bos"`` in files written before, which for an
        encoder-decoder meant no ``</s>``: those were trained on ``[prompt, src]``). A file without either was
        trained without the BOS and keeps that layout. A plain PEFT folder (no ``softprompt.json``, empty
        :attr:`meta`) was trained by PEFT on text tokenised with special tokens.
        """
        if "specials" in self.meta:  # checked to be a bool when read
            return bool(self.meta["specials"])
        if "bos" in self.meta:
            # written before "specials": an encoder-decoder's prompt was trained on [P, src] without </s>
            return bool(self.meta["bos"]) and not trails_source(self.peft_config.get("task_type"))
        return not self.meta

    @property
    def fingerprint(self) -> dict | None:
        """Fingerprint of the base model the prompt was trained on, if recorded."""
        return self.meta.get("fingerprint")


def _softprompt_version() -> str:
    try:
        return importlib.metadata.version("softprompt")
    except importlib.metadata.PackageNotFoundError:
        import softprompt

        return str(getattr(softprompt, "__version__", "unknown"))


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _config_problems(cfg: Any) -> list[str]:
    """Everything wrong with an ``adapter_config`` dict (empty when usable)."""
    if not isinstance(cfg, dict):
        return [f"expected a JSON object, got {type(cfg).__name__}"]
    peft_type = cfg.get("peft_type")
    if peft_type is None:
        return ["has no 'peft_type'"]
    try:
        method = method_for_peft_type(peft_type)
    except ValueError as e:
        return [str(e)]
    problems = [f"'{key}' must be a positive integer, got {cfg.get(key)!r}"
                for key in ("num_virtual_tokens", "token_dim") if not _is_positive_int(cfg.get(key))]
    problems += method.peft_config_problems(cfg)
    subs = cfg.get("num_transformer_submodules", 1)
    if subs not in (None, 1):
        problems.append(f"num_transformer_submodules is {subs!r}: supported are 1, and 2 in a SEQ_2_SEQ_LM "
                        "PROMPT_TUNING or P_TUNING folder with 2 x num_virtual_tokens prompt rows (PEFT's T5 layout)")
    return problems


def _one_submodule(cfg, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """A PEFT encoder-decoder prompt folder as one submodule's: PEFT saves ``2 x num_virtual_tokens`` rows for a
    SEQ_2_SEQ_LM prompt (``num_transformer_submodules`` 2) and its encoder reads only the first
    ``num_virtual_tokens`` (its forward and generate); those rows are the prompt. Anything else is unchanged
    (and checked as it is)."""
    if not (isinstance(cfg, dict) and cfg.get("num_transformer_submodules") == 2
            and cfg.get("task_type") == "SEQ_2_SEQ_LM" and cfg.get("peft_type") in ("PROMPT_TUNING", "P_TUNING")
            and _is_positive_int(cfg.get("num_virtual_tokens"))):
        return cfg, tensors
    p, emb = cfg["num_virtual_tokens"], tensors.get("prompt_embeddings")
    if emb is None or emb.ndim != 2 or emb.shape[0] != 2 * p:
        return cfg, tensors
    return {**cfg, "num_transformer_submodules": 1}, {**tensors, "prompt_embeddings": emb[:p].clone()}


def _head_tensor_problems(cfg: dict, head: dict[str, torch.Tensor]) -> list[str]:
    """Classification-head tensors (``base_model.*``) exist exactly for ``task_type`` SEQ_CLS, 1-D or 2-D."""
    seq_cls = cfg.get("task_type") == "SEQ_CLS"
    if seq_cls and not head:
        return [f"task_type SEQ_CLS but no classification head tensors ({SAVED_PREFIX}classifier.* or "
                f"{SAVED_PREFIX}score.*)"]
    if head and not seq_cls:
        return [f"head tensors {sorted(head)} but task_type is {cfg.get('task_type')!r}, not SEQ_CLS"]
    heads = tuple(f"{SAVED_PREFIX}{m}." for m in HEAD_MODULE_NAMES)
    if head and not any(key.startswith(heads) for key in head):
        return [f"no classification head tensors ({SAVED_PREFIX}classifier.* or {SAVED_PREFIX}score.*) among "
                f"{sorted(head)}"]
    # PEFT saves every module whose name ends with a modules_to_save entry (classifier: DistilBERT's
    # pre_classifier too), and modules_to_save may add a layer the checkpoint lacks (DeBERTa's pooler.dense); the
    # model checks at load that each is one it allows (methods.head.head_problems)
    extra = cfg.get("modules_to_save") if isinstance(cfg.get("modules_to_save"), list) else []
    outside = [key for key in head if not saved_by_peft(key, [*HEAD_MODULE_NAMES, *extra])]
    if outside:  # base_model.bert.embeddings.word_embeddings.weight would replace the encoder's embeddings
        return [f"tensors {outside} are not in a classification head ({SAVED_PREFIX}classifier.* or "
                f"{SAVED_PREFIX}score.*) nor in a module whose name ends with a modules_to_save entry: a stored "
                "prompt may replace the head only, never the model's weights"]
    return [f"head tensor {key!r} must be 1-D or 2-D, has shape {tuple(t.shape)}" for key, t in head.items()
            if t.ndim not in (1, 2)]


def _tensor_problems(cfg: dict, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Everything wrong with the tensors given a valid ``adapter_config`` (empty when usable)."""
    head = {k: v for k, v in tensors.items() if is_head_key(k)}
    problems = _head_tensor_problems(cfg, head)
    problems += _values_problems(head)
    tensors = {k: v for k, v in tensors.items() if not is_head_key(k)}
    expected = method_for_peft_type(cfg["peft_type"]).peft_tensor_shapes(cfg)
    problems += [f"missing tensor {key!r} (found {sorted(tensors)})" for key in expected if key not in tensors]
    problems += [f"unexpected tensor {key!r} (expected {sorted(expected)})" for key in tensors
                 if key not in expected]
    for key, t in tensors.items():
        if t.ndim != 2:
            problems.append(f"tensor {key!r} must be 2-D, has shape {tuple(t.shape)}")
        elif key in expected and tuple(t.shape) != expected[key]:
            problems.append(f"tensor {key!r} has shape {tuple(t.shape)} but {CONFIG_NAME} "
                            f"(num_virtual_tokens={cfg['num_virtual_tokens']}, token_dim={cfg['token_dim']}) "
                            f"implies {expected[key]}")
    return problems + _values_problems(tensors)


FILE_LIMITS = {CONFIG_NAME: MAX_JSON_BYTES, META_NAME: MAX_JSON_BYTES, WEIGHTS_NAME: MAX_WEIGHTS_BYTES}  # bytes
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _values_problems(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Tensors that are not float16/bfloat16/float32/float64 (an 8-bit float cannot even be checked for NaN:
    its NotImplementedError broke the whole store's listing) or hold NaN/Inf."""
    problems = []
    for key, t in tensors.items():
        if t.dtype not in FLOAT_DTYPES:
            problems.append(f"tensor {key!r} must be float16, bfloat16, float32 or float64, has dtype {t.dtype}")
        elif not bool(torch.isfinite(t).all()):
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            problems.append(f"tensor {key!r} has {nan} NaN and {inf} Inf values")
    return problems


def _dtype_problems(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> list[str]:
    """Tensors finite as stored that overflow to Inf in float32 (the methods hold their parameters in it) or in
    the model's dtype (they are cast to it to run): a float64 1e39 would make NaN scores, not an error."""
    problems = []
    for key, t in tensors.items():
        for target in dict.fromkeys([torch.float32, dtype if dtype.is_floating_point else torch.float32]):
            if not bool(torch.isfinite(t.to(target)).all()):
                problems.append(f"tensor {key!r} has values up to {float(t.abs().max()):.4g} that overflow to Inf "
                                f"in {target} (largest finite {torch.finfo(target).max:.4g})")
                break
    return problems


def check_model_compatible(stored: StoredPrompt, model, check_fingerprint: bool = True) -> None:
    """Check that ``stored`` fits ``model``: hidden size and context length always, fingerprint when recorded.

    Raises:
        StoreError: naming the folder and every differing field.
    """
    where = stored.path if stored.path is not None else "prompt"
    method = method_for_peft_type(stored.peft_config["peft_type"])
    try:
        token_dim, expected = stored.peft_config.get("token_dim"), method.peft_token_dim(model)
    except ValueError as e:  # no layout of this kind of prompt fits the model (Gemma 4's per-layer head sizes)
        raise StoreError(f"{where}: the prompt cannot work with the model ({type(model).__name__}): {e}") from None
    if token_dim != expected:
        raise StoreError(f"{where}: {CONFIG_NAME} has token_dim {token_dim} but the model "
                         f"({type(model).__name__}) has {method.peft_token_dim_meaning} {expected}; the prompt "
                         "cannot work with it")
    p, context = stored.peft_config.get("num_virtual_tokens"), context_length(model.config)
    if context is not None and isinstance(p, int) and p >= context[0]:
        raise StoreError(f"{where}: the prompt has {p} virtual tokens but the model ({type(model).__name__}) has a "
                         f"context of {context[0]} positions ({context[1]}): no room is left for text; the prompt "
                         "cannot work with it")
    mismatch = method.peft_model_mismatch(stored.peft_config, model, stored.method_config)
    if mismatch:
        raise StoreError(f"{where}: {CONFIG_NAME} (with {META_NAME}'s method_config) has {mismatch}")
    head = {k: v for k, v in stored.tensors.items() if is_head_key(k)}
    if head and not family_of(model).has_head:
        raise StoreError(f"{where}: the prompt was trained with a classification head (task_type SEQ_CLS) but "
                         f"{type(model).__name__} is not a sequence classifier: load the model with "
                         "--task-type seq_cls")
    if family_of(model).has_head and not head:
        raise StoreError(f"{where}: {type(model).__name__} is a sequence classifier but the prompt has no "
                         f"classification head (task_type {stored.peft_config.get('task_type')!r})")
    problem = task_type_problem(model, stored.peft_config.get("task_type"))
    if problem:
        raise StoreError(f"{where}: {CONFIG_NAME} has {problem}; the prompt cannot work with it")
    problems = head_problems(head, model) if head else []
    if problems:
        raise StoreError(f"{where}: the classification head does not fit the model: " + "; ".join(problems))
    problems = _dtype_problems(stored.tensors, getattr(model, "dtype", torch.float32))
    if problems:
        raise StoreError(f"{where}: " + "; ".join(problems))
    stored_fp = stored.fingerprint
    if check_fingerprint and stored_fp:
        diffs = fingerprint_mismatch(stored_fp, fingerprint(model))
        if diffs:
            raise StoreError(f"{where}: the prompt was trained on a different base model "
                             f"({'; '.join(diffs)}). Pass check_fingerprint=False "
                             "(CLI --no-fingerprint-check) to use it anyway.")


def _read_tensors(folder: Path, names: frozenset[str], data: bytes | None) -> dict[str, torch.Tensor]:
    path = folder / WEIGHTS_NAME
    if data is None:
        pickles = sorted(n for n in names if Path(n).suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise StoreError(f"{folder}: pickle weights are refused ({', '.join(pickles)}): loading pickle "
                             f"can run arbitrary code. Only {WEIGHTS_NAME} is accepted; convert the weights "
                             "to safetensors where you trust their source.")
        raise StoreError(f"{folder}: missing {WEIGHTS_NAME}")
    try:
        return safetensors.torch.load(data)
    except Exception as e:  # safetensors raises its own SafetensorError
        raise StoreError(f"{path}: not a readable safetensors file ({e})") from e


def _method_from_meta(meta: Any, peft_type: str, path: Path) -> tuple[str, dict]:
    if not isinstance(meta, dict):
        raise StoreError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    version = meta.get("format_version")
    if not _is_positive_int(version):
        raise StoreError(f"{path}: 'format_version' must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise StoreError(f"{path}: format_version {version} was written by a newer softprompt (this one "
                         f"reads up to {FORMAT_VERSION}); upgrade softprompt")
    method, config = meta.get("method"), meta.get("method_config")
    problems = []
    if method not in methods_stored_as(peft_type):
        problems.append(f"'method' is {method!r} but {CONFIG_NAME} has peft_type {peft_type!r} "
                        f"(method {method_for_peft_type(peft_type).name!r})")
    if not isinstance(config, dict):
        problems.append(f"'method_config' must be an object, got {config!r}")
    for key in ("fingerprint", "task", "train_config", "metrics"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            problems.append(f"{key!r} must be an object or null, got {type(meta[key]).__name__}")
    if isinstance(meta.get("fingerprint"), dict):  # compared with the model's when loaded on it
        problems += [f"fingerprint.{p}" for p in fingerprint_problems(meta["fingerprint"])]
    data = meta["train_config"].get("data") if isinstance(meta.get("train_config"), dict) else None
    if data is not None and not isinstance(data, dict):  # eval --store reads the data files it trained on here
        problems.append(f"'train_config.data' must be an object or null, got {type(data).__name__}")
    for key in ("bos", "specials"):
        if key in meta and not isinstance(meta[key], bool):
            problems.append(f"{key!r} must be true or false, got {meta[key]!r}")
    if problems:
        raise StoreError(f"{path}: " + "; ".join(problems))
    return method, config


def load_prompt(path: str | Path, model=None, check_fingerprint: bool = True) -> StoredPrompt:
    """Read and validate a stored prompt (ours, or a plain PEFT folder).

    Args:
        path: the prompt folder.
        model: when given, the prompt must fit it (hidden size; fingerprint, see ``check_fingerprint``).
        check_fingerprint: compare the recorded base-model fingerprint with ``model``'s.

    Returns:
        The validated :class:`StoredPrompt`; ``build_method()`` turns it into a module.

    Raises:
        StoreError: naming the folder or file and every problem found.
    """
    folder = Path(path).expanduser()
    # one version of the folder even while it is being overwritten; symlinked files are refused
    snap = read_folder(folder, (WEIGHTS_NAME, CONFIG_NAME, META_NAME), FILE_LIMITS)
    tensors = _read_tensors(folder, snap.names, snap.files.get(WEIGHTS_NAME))
    cfg_path = folder / CONFIG_NAME
    if CONFIG_NAME not in snap.files:
        raise StoreError(f"{cfg_path}: missing")
    cfg, tensors = _one_submodule(parse_json(snap.files[CONFIG_NAME], cfg_path), tensors)
    problems = _config_problems(cfg)
    if problems:
        raise StoreError(f"{cfg_path}: " + "; ".join(problems))
    problems = _tensor_problems(cfg, tensors)
    if problems:
        raise StoreError(f"{folder / WEIGHTS_NAME}: " + "; ".join(problems))
    meta_path = folder / META_NAME
    if META_NAME in snap.files:
        meta = parse_json(snap.files[META_NAME], meta_path)
        method, method_config = _method_from_meta(meta, cfg["peft_type"], meta_path)
    else:  # written by PEFT
        meta, meta_path = {}, cfg_path
        reader = method_for_peft_type(cfg["peft_type"])
        method = reader.name
        try:
            method_config = reader.config_from_peft(cfg, tensors)
        except (ValueError, TypeError, KeyError, OverflowError, AttributeError) as e:  # "x" or Infinity heads
            raise StoreError(f"{cfg_path}: {e}") from e
    stored = StoredPrompt(path=folder, method=method, method_config=method_config, tensors=tensors,
                          peft_config=cfg, meta=meta)  # parses and validates meta["task"]
    try:
        stored.build_method()  # the method's own config (field types included) and tensor checks
    except ValueError as e:
        raise StoreError(f"{meta_path}: {e}") from e
    if model is not None:
        check_model_compatible(stored, model, check_fingerprint)
    return stored


def replaceable_folder(folder: Path) -> bool:
    """Only an empty folder or a stored prompt may be replaced by ``overwrite=True``."""
    return not any(folder.iterdir()) or (folder / CONFIG_NAME).is_file() or (folder / META_NAME).is_file()


def write_peft_files(folder: Path, tensors: dict[str, torch.Tensor], peft_config: dict) -> None:
    """Write PEFT's two files into ``folder`` (fsynced)."""
    write_safetensors(folder / WEIGHTS_NAME, tensors)
    write_json(folder / CONFIG_NAME, peft_config)


def save_prompt(path: str | Path, method: PromptMethod, model, task: dict | None = None,
                train_config: dict | None = None, metrics: dict | None = None,
                overwrite: bool = False, bos: bool = True) -> Path:
    """Store ``method`` as a folder, atomically (complete or not at all; see :mod:`softprompt.store.atomic`).

    Args:
        path: folder to create.
        method: the trained method.
        model: the frozen base model it was trained on (fingerprinted).
        task: ``template``, ``target_field``, ``verbalizer`` (or None), ``target_prefix`` (missing keys
            are stored as null; extra keys are kept).
        train_config: training arguments to record.
        metrics: evaluation results to record.
        overwrite: replace an existing stored prompt at ``path``.
        bos: the prompt was trained with the model's BOS starting the text (what training does); a prompt
            saved again from a stored one passes its :attr:`StoredPrompt.bos`.

    Returns:
        The absolute folder path.

    Raises:
        StoreError: ``path`` exists (without ``overwrite``), or the tensors/config would not load back.
    """
    tensors = method.stored_tensors()
    peft_config = method.peft_config(model)
    if method.classifier is not None:  # what PeftModelForSequenceClassification writes and reads back
        peft_config.update(task_type="SEQ_CLS",
                           modules_to_save=list(HEAD_MODULE_NAMES) + method.classifier.extra_modules())
    problems = _config_problems(peft_config)
    problems = problems or _tensor_problems(peft_config, tensors) or method.saved_config_problems()
    if not problems:
        needed = method_for_peft_type(peft_config["peft_type"]).peft_token_dim(model)
        if peft_config["token_dim"] != needed:
            problems.append(f"token_dim {peft_config['token_dim']} differs from what the model needs ({needed})")
    if problems:
        raise StoreError(f"refusing to save {path}: " + "; ".join(problems))
    TaskRecord.parse(task, f"refusing to save {path}")  # what load_prompt would refuse is not written
    meta = {
        "format_version": FORMAT_VERSION,
        "method": method.name,
        "method_config": method.config.to_dict(),
        "fingerprint": fingerprint(model),
        "task": None if task is None else {**dict.fromkeys(TASK_KEYS), **task},
        "bos": bool(bos),
        "specials": bool(bos),  # the same layout, named for every family (T5: </s> after the source)
        "train_config": dict(train_config or {}),
        "metrics": dict(metrics or {}),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "softprompt_version": _softprompt_version(),
    }

    def write(tmp: Path) -> None:
        write_peft_files(tmp, tensors, peft_config)
        write_json(tmp / META_NAME, meta)

    return write_folder_atomically(path, write, overwrite, replaceable_folder)

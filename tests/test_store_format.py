"""Stored-prompt format: round trip, atomic writes, and refusal of untrusted/mismatched folders."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import safetensors.torch
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from softprompt.methods import PEFT_TYPE_TO_METHOD, PrefixTuningConfig, PromptTuning, build_method
from softprompt.model import fingerprint, prepare_frozen
from softprompt.store import (
    CONFIG_NAME,
    META_NAME,
    WEIGHTS_NAME,
    StoreError,
    load_prompt,
    save_prompt,
)

P, H = 4, 32
TASK = {"template": "Review: {text}\nSentiment:", "target_field": "label",
        "verbalizer": {"fresh": "positive", "rotten": "negative"}, "target_prefix": " "}


def tiny_llama(seed: int = 0, hidden: int = H) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=hidden, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    prepare_frozen(model)
    return model


def tiny_prompt(model, seed: int = 0) -> PromptTuning:
    return build_method("prompt_tuning", {"num_virtual_tokens": P, "init": "random", "seed": seed}, model,
                        tokenizer=None)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture
def saved(tmp_path, model) -> Path:
    return save_prompt(tmp_path / "p", tiny_prompt(model), model, task=TASK, train_config={"lr": 0.3},
                       metrics={"accuracy": 0.75, "loss": float("nan")})


def at(path: Path, text: str) -> str:
    """Regex matching ``"<path>: <text>"`` literally (how every StoreError starts)."""
    return re.escape(f"{path}: {text}")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_round_trip(tmp_path, model):
    method = tiny_prompt(model)
    out = save_prompt(tmp_path / "p", method, model, task=TASK, train_config={"lr": 0.3, "out": tmp_path},
                      metrics={"accuracy": 0.75, "loss": float("nan")})
    assert out == (tmp_path / "p").absolute()
    assert sorted(p.name for p in out.iterdir()) == sorted([WEIGHTS_NAME, CONFIG_NAME, META_NAME])
    assert [p.name for p in tmp_path.iterdir()] == ["p"]  # no temp folders left

    meta = json.loads((out / META_NAME).read_text())  # strict JSON: NaN was stored as null
    cfg = json.loads((out / CONFIG_NAME).read_text())
    assert meta["format_version"] == 1 and meta["method"] == "prompt_tuning"
    assert meta["method_config"] == method.config.to_dict()
    assert meta["fingerprint"] == fingerprint(model)
    assert meta["task"] == TASK
    assert meta["train_config"] == {"lr": 0.3, "out": str(tmp_path)}
    assert meta["metrics"] == {"accuracy": 0.75, "loss": None}
    assert meta["created"].endswith("+00:00") and meta["softprompt_version"]
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["num_virtual_tokens"] == P and cfg["token_dim"] == H
    with safetensors.safe_open(out / WEIGHTS_NAME, "pt") as f:
        assert f.metadata() == {"format": "pt"} and list(f.keys()) == ["prompt_embeddings"]

    stored = load_prompt(out, model=model)
    assert stored.path == out and stored.method == "prompt_tuning" and stored.peft_config == cfg
    assert stored.task == TASK and stored.fingerprint == fingerprint(model)
    assert torch.equal(stored.tensors["prompt_embeddings"], method.embeddings.detach())
    rebuilt = stored.build_method()
    assert isinstance(rebuilt, PromptTuning) and not rebuilt.training
    assert rebuilt.config == method.config
    assert torch.equal(rebuilt().embeds, method.embeddings.detach())


def test_task_missing_keys_are_null(tmp_path, model):
    out = save_prompt(tmp_path / "p", tiny_prompt(model), model, task={"template": "{text}"})
    assert load_prompt(out).task == {"template": "{text}", "target_field": None, "verbalizer": None,
                                     "target_prefix": None}
    out2 = save_prompt(tmp_path / "q", tiny_prompt(model), model)
    assert load_prompt(out2).task is None


def test_refuses_existing_without_overwrite(saved, model):
    before = snapshot(saved)
    with pytest.raises(StoreError, match=re.escape(str(saved)) + ".*already exists.*overwrite"):
        save_prompt(saved, tiny_prompt(model, seed=1), model)
    assert snapshot(saved) == before


def test_overwrite_replaces(saved, model):
    new = tiny_prompt(model, seed=1)
    save_prompt(saved, new, model, overwrite=True)
    assert torch.equal(load_prompt(saved).tensors["prompt_embeddings"], new.embeddings.detach())
    assert [p.name for p in saved.parent.iterdir()] == ["p"]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_the_weights_are_as_readable_as_the_files_beside_them(tmp_path, model, umask):
    """safetensors writes its file owner-only (0o600) whatever the umask: a saved or exported folder's config was
    readable by another user or a container serving it (vLLM), its weights were not. They get the umask's mode."""
    from softprompt.store import export_peft

    old = os.umask(umask)
    try:
        save_prompt(tmp_path / "p", tiny_prompt(model), model)
        export_peft(tmp_path / "p", tmp_path / "peft")
    finally:
        os.umask(old)
    for folder in (tmp_path / "p", tmp_path / "peft"):
        modes = {f.name: f.stat().st_mode & 0o777 for f in folder.iterdir()}
        assert modes[WEIGHTS_NAME] == modes[CONFIG_NAME] == 0o666 & ~umask, modes


def test_overwrite_refuses_foreign_folder(tmp_path, model):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("precious")
    with pytest.raises(StoreError, match="does not look like a stored prompt"):
        save_prompt(tmp_path / "home", tiny_prompt(model), model, overwrite=True)
    assert (tmp_path / "home" / "notes.txt").read_text() == "precious"


@pytest.mark.parametrize("overwrite", [False, True])
def test_failure_writing_weights_leaves_nothing(tmp_path, model, monkeypatch, overwrite):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    target = tmp_path / "p"
    if overwrite:  # an existing prompt, written before the failure was injected
        monkeypatch.undo()
        save_prompt(target, tiny_prompt(model), model)
        monkeypatch.setattr(safetensors.torch, "save_file", boom)
    before = snapshot(target) if overwrite else None
    with pytest.raises(StoreError, match=re.escape("writing it failed (disk full)")):
        save_prompt(target, tiny_prompt(model, seed=1), model, overwrite=overwrite)
    assert [p.name for p in tmp_path.iterdir()] == (["p"] if overwrite else [])
    if overwrite:
        assert snapshot(target) == before


def test_failure_writing_metadata_keeps_old_folder(saved, model, monkeypatch):
    before = snapshot(saved)

    def boom(*args, **kwargs):
        raise RuntimeError("json exploded")

    monkeypatch.setattr("softprompt.store.atomic.json.dumps", boom)
    with pytest.raises(RuntimeError, match="json exploded"):
        save_prompt(saved, tiny_prompt(model, seed=1), model, overwrite=True)
    assert snapshot(saved) == before
    assert [p.name for p in saved.parent.iterdir()] == ["p"]


def test_failure_during_swap_restores_old_folder(saved, model, monkeypatch):
    """The old folder is already renamed aside when moving the new one in fails: it must come back."""
    monkeypatch.setattr("softprompt.store.atomic.exchange", lambda a, b: False)  # the two-rename fallback
    before = snapshot(saved)
    real_replace, calls = os.replace, []

    def flaky_replace(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # 1: old -> aside, 2: new -> target
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    with pytest.raises(StoreError, match=re.escape("writing it failed (rename failed)")):
        save_prompt(saved, tiny_prompt(model, seed=1), model, overwrite=True)
    monkeypatch.undo()
    assert len(calls) == 3 and calls[0][0] == "p" and calls[2][1] == "p"
    assert snapshot(saved) == before
    assert [p.name for p in saved.parent.iterdir()] == ["p"]


def test_refuses_other_base_model(saved):
    other = tiny_llama(seed=1)  # same architecture, different weights
    with pytest.raises(StoreError) as e:
        load_prompt(saved, model=other)
    msg = str(e.value)
    assert str(saved) in msg and "embedding_sha256" in msg and "different base model" in msg
    assert "check_fingerprint=False" in msg and "--no-fingerprint-check" in msg
    assert "hidden_size" not in msg and "vocab_size" not in msg  # only the differing fields
    stored = load_prompt(saved, model=other, check_fingerprint=False)
    assert stored.tensors["prompt_embeddings"].shape == (P, H)


def test_refuses_wrong_hidden_size(saved):
    wide = tiny_llama(hidden=48)
    for check in (True, False):  # a hard mismatch: the fingerprint switch does not help
        expected = re.escape(f"{saved}: {CONFIG_NAME} has token_dim 32") + ".*hidden size 48"
        with pytest.raises(StoreError, match=expected):
            load_prompt(saved, model=wide, check_fingerprint=check)


def write_tensors(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    safetensors.torch.save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})


@pytest.mark.parametrize(("tensors", "expected"), [
    ({"prompt_embeddings": torch.full((P, H), float("nan"))}, "'prompt_embeddings' has 128 NaN and 0 Inf"),
    ({"prompt_embeddings": torch.ones(P, H).index_fill_(0, torch.tensor([1]), float("inf"))},
     "'prompt_embeddings' has 0 NaN and 32 Inf"),
    ({"embeddings": torch.zeros(P, H)}, "missing tensor 'prompt_embeddings'"),
    ({"prompt_embeddings": torch.zeros(P, H), "extra": torch.zeros(1, H)}, "unexpected tensor 'extra'"),
    ({"prompt_embeddings": torch.zeros(P + 1, H)},
     r"shape \(5, 32\) but adapter_config.json \(num_virtual_tokens=4, token_dim=32\) implies \(4, 32\)"),
    ({"prompt_embeddings": torch.zeros(P, H + 1)}, r"shape \(4, 33\)"),
    ({"prompt_embeddings": torch.zeros(P * H)}, r"must be 2-D, has shape \(128,\)"),
    ({"prompt_embeddings": torch.zeros(P, H, dtype=torch.int32)},
     "must be float16, bfloat16, float32 or float64, has dtype torch.int32"),
])
def test_refuses_bad_tensors(saved, tensors, expected):
    write_tensors(saved, tensors)
    with pytest.raises(StoreError, match=expected) as e:
        load_prompt(saved)
    assert str(e.value).startswith(f"{saved / WEIGHTS_NAME}: ")


def test_refuses_method_config_disagreeing_with_tensors(saved):
    meta = json.loads((saved / META_NAME).read_text())
    meta["method_config"]["num_virtual_tokens"] = 7
    (saved / META_NAME).write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=re.escape(f"{saved / META_NAME}: prompt_embeddings has shape")):
        load_prompt(saved)


def test_refuses_pickle_weights(tmp_path):
    folder = tmp_path / "peft"
    folder.mkdir()
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    (folder / CONFIG_NAME).write_text(json.dumps({"peft_type": "PROMPT_TUNING"}))
    with pytest.raises(StoreError, match=at(folder, "pickle weights are refused (adapter_model.bin)")):
        load_prompt(folder)


def test_refuses_unsupported_peft_type(saved):
    cfg = json.loads((saved / CONFIG_NAME).read_text())
    cfg["peft_type"] = "LORA"
    (saved / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(StoreError, match=re.escape(f"{saved / CONFIG_NAME}: unsupported peft_type 'LORA' "
                                                   "(supported: PREFIX_TUNING, PROMPT_TUNING, P_TUNING)")):
        load_prompt(saved)
    assert PEFT_TYPE_TO_METHOD == {"PROMPT_TUNING": "prompt_tuning", "P_TUNING": "p_tuning",
                                   "PREFIX_TUNING": "prefix_tuning"}


@pytest.mark.parametrize(("text", "expected"), [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ("{}", "has no 'peft_type'"),
    ('{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4, "token_dim": "32"}',
     "'token_dim' must be a positive integer"),
    ('{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4, "token_dim": 32, '
     '"num_transformer_submodules": 2}',
     "num_transformer_submodules is 2"),
])
def test_refuses_bad_adapter_config(saved, text, expected):
    (saved / CONFIG_NAME).write_text(text)
    with pytest.raises(StoreError, match=expected) as e:
        load_prompt(saved)
    assert str(e.value).startswith(f"{saved / CONFIG_NAME}: ")


def test_refuses_a_peft_type_that_is_not_a_string(saved):
    (saved / CONFIG_NAME).write_text('{"peft_type": ["PROMPT_TUNING"], "num_virtual_tokens": 4, "token_dim": 32}')
    with pytest.raises(StoreError, match=re.escape(f"{saved / CONFIG_NAME}: unsupported peft_type ['PROMPT_TUNING']")):
        load_prompt(saved)


def test_refuses_newer_format_and_missing_files(saved, tmp_path):
    meta = json.loads((saved / META_NAME).read_text())
    (saved / META_NAME).write_text(json.dumps({**meta, "format_version": 2}))
    with pytest.raises(StoreError, match=at(saved / META_NAME, "format_version 2") + ".*newer softprompt"):
        load_prompt(saved)
    (saved / CONFIG_NAME).unlink()
    with pytest.raises(StoreError, match=re.escape(f"{saved / CONFIG_NAME}: missing")):
        load_prompt(saved)
    (saved / WEIGHTS_NAME).unlink()
    with pytest.raises(StoreError, match=re.escape(f"{saved}: missing {WEIGHTS_NAME}")):
        load_prompt(saved)
    with pytest.raises(StoreError, match=re.escape(f"{tmp_path / 'nope'}: no such prompt folder")):
        load_prompt(tmp_path / "nope")


def test_a_file_given_for_the_prompt_folder_is_named_as_such_at_once(saved, tmp_path):
    # a file was taken for a folder being replaced: read 100 times over about a second, then "replaced 100 times
    # while being read; try again"
    with pytest.raises(StoreError, match=re.escape(f"{saved / CONFIG_NAME}: not a folder; a prompt is the folder "
                                                   "that holds adapter_config.json and adapter_model.safetensors "
                                                   "(give its folder)")):
        load_prompt(saved / CONFIG_NAME)
    other = tmp_path / "notes.txt"
    other.write_text("x")
    with pytest.raises(StoreError, match=re.escape(f"{other}: not a folder; a prompt is the folder that holds "
                                                   "adapter_config.json and adapter_model.safetensors")):
        load_prompt(other)
    with pytest.raises(StoreError, match=re.escape(f"{other / 'x'}: no such prompt folder")):
        load_prompt(other / "x")


def test_refuses_corrupt_safetensors(saved):
    (saved / WEIGHTS_NAME).write_bytes(b"\xff" * 16)
    with pytest.raises(StoreError, match=at(saved / WEIGHTS_NAME, "not a readable safetensors file")):
        load_prompt(saved)


class _Trap:
    """Unpickled, it creates the folder ``marker`` (what a malicious pickle would do with a shell command)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_load_never_unpickles(saved, model, tmp_path, monkeypatch):
    """A booby-trapped PEFT ``adapter_model.bin`` beside the safetensors weights is never read, and a folder with
    only that pickle (PEFT's old format) is refused without reading it."""
    import pickle

    marker = tmp_path / "unpickled"
    torch.save({"prompt_embeddings": _Trap(marker)}, saved / "adapter_model.bin")  # as PEFT wrote its .bin
    torch.load(saved / "adapter_model.bin", weights_only=False)  # the trap is live: loading it runs its code
    assert marker.is_dir()
    marker.rmdir()
    alone = tmp_path / "old-peft"
    alone.mkdir()
    (alone / "adapter_model.bin").write_bytes((saved / "adapter_model.bin").read_bytes())
    (alone / CONFIG_NAME).write_bytes((saved / CONFIG_NAME).read_bytes())

    def forbidden(name):
        def refuse(*args, **kwargs):
            raise AssertionError(f"{name} called")
        return refuse

    monkeypatch.setattr(torch, "load", forbidden("torch.load"))
    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden(f"pickle.{name}"))
    stored = load_prompt(saved, model)  # from the safetensors weights
    expected = safetensors.torch.load_file(str(saved / WEIGHTS_NAME))
    assert stored.tensors.keys() == expected.keys()
    assert all(torch.equal(stored.tensors[k], expected[k]) for k in expected)
    assert stored.build_method().embeddings.shape == (P, H)
    with pytest.raises(StoreError, match=at(alone, "pickle weights are refused (adapter_model.bin): loading pickle "
                                                   f"can run arbitrary code. Only {WEIGHTS_NAME} is accepted")):
        load_prompt(alone, model)
    assert not marker.exists()


def test_refuses_to_save_non_finite(tmp_path, model):
    method = tiny_prompt(model)
    with torch.no_grad():
        method.embeddings[0, 0] = float("nan")
    with pytest.raises(StoreError, match="refusing to save .*'prompt_embeddings' has 1 NaN"):
        save_prompt(tmp_path / "p", method, model)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_save_a_method_holding_another_methods_config(tmp_path, model):
    """A prompt_tuning method given prefix tuning's config was saved, and load_prompt refused the folder."""
    method = tiny_prompt(model)
    method.config = PrefixTuningConfig(num_virtual_tokens=P)
    with pytest.raises(StoreError, match=r"refusing to save .*: its prompt_tuning config would not load back: "
                                         r"prompt_tuning config: unknown field\(s\) \['encoder_hidden_size'"):
        save_prompt(tmp_path / "p", method, model)
    assert list(tmp_path.iterdir()) == []

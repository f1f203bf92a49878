"""Loading the frozen base model (local folder, GGUF, embedded alias) and fingerprinting it."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from softprompt import forward
from softprompt.config import ConfigError, ModelArgs
from softprompt.model import (
    ModelLoadError,
    fingerprint,
    fingerprint_mismatch,
    load_base_model,
    resolve_dtype,
)
from tests.conftest import WORD_IDS, make_model

CPU = torch.device("cpu")


def test_fingerprint_same_weights_same_fingerprint():
    a, b = make_model("llama", seed=0), make_model("llama", seed=0)
    fa = fingerprint(a)
    assert fa == fingerprint(b)
    assert fa["architecture"] == "LlamaForCausalLM" and fa["model_type"] == "llama"
    assert (fa["hidden_size"], fa["vocab_size"], fa["num_layers"]) == (32, 64, 2)
    assert len(fa["embedding_sha256"]) == 64
    assert fingerprint_mismatch(fa, fingerprint(b)) == []


def test_fingerprint_ignores_dtype():
    fp32 = make_model("llama", seed=0)
    bf16 = make_model("llama", seed=0).to(torch.bfloat16)
    assert bf16.get_input_embeddings().weight.dtype == torch.bfloat16
    assert fingerprint(fp32)["embedding_sha256"] == fingerprint(bf16)["embedding_sha256"]
    assert fingerprint_mismatch(fingerprint(fp32), fingerprint(bf16)) == []


def test_fingerprint_matches_fp32_bf16_and_fp16_loads_of_one_checkpoint():
    # a prompt trained in fp32 (the CPU default) was refused by a server loading the model in fp16: rounding
    # to fp16 then to bf16 differs from rounding to bf16 once for a few percent of the values
    fp32 = make_model("llama", seed=0)
    fp16 = make_model("llama", seed=0).to(torch.float16)
    bf16 = make_model("llama", seed=0).to(torch.bfloat16)
    fps = {name: fingerprint(m) for name, m in (("fp32", fp32), ("fp16", fp16), ("bf16", bf16))}
    assert fps["fp32"]["embedding_sha256"] != fps["fp16"]["embedding_sha256"]  # the one hash did not match
    for a, b in (("fp32", "fp16"), ("fp16", "fp32"), ("fp32", "bf16"), ("bf16", "fp32"), ("fp16", "fp16")):
        assert fingerprint_mismatch(fps[a], fps[b]) == [], (a, b)
    # a bf16 checkpoint loaded in fp16 (bf16 values convert to fp16 exactly); an fp32 checkpoint rounded to bf16 on
    # one side and to fp16 on the other has lost different bits on each: that pair still needs the flag
    assert fingerprint_mismatch(fps["bf16"], fingerprint(make_model("llama", seed=0).to(torch.bfloat16).half())) == []
    # a prompt saved before the fp16 hash existed still matches the loads it matched before, and only those
    old = {k: v for k, v in fps["fp32"].items() if k != "embedding_sha256_fp16"}
    assert fingerprint_mismatch(old, fps["bf16"]) == [] and fingerprint_mismatch(old, fps["fp16"])
    other = fingerprint(make_model("llama", seed=1).half())
    assert [p.split(":")[0] for p in fingerprint_mismatch(fps["fp32"], other)] == ["embedding_sha256"]


def test_fingerprint_mismatch_other_weights():
    a, b = fingerprint(make_model("llama", seed=0)), fingerprint(make_model("llama", seed=1))
    problems = fingerprint_mismatch(a, b)
    assert problems == [f"embedding_sha256: prompt has {a['embedding_sha256']!r}, model has "
                        f"{b['embedding_sha256']!r}"]


def test_fingerprint_mismatch_other_architecture():
    a, b = fingerprint(make_model("llama")), fingerprint(make_model("gpt2"))
    problems = fingerprint_mismatch(a, b)
    assert [p.split(":")[0] for p in problems] == ["architecture", "embedding_sha256"]
    assert "prompt has 'LlamaForCausalLM', model has 'GPT2LMHeadModel'" in problems[0]


def test_fingerprint_mismatch_ignores_name_and_missing_keys():
    fp = fingerprint(make_model("llama"))
    assert fingerprint_mismatch({**fp, "name_or_path": "somewhere/else"}, fp) == []
    # a prompt stored with fewer fields (an older file) is checked on the fields it has
    assert fingerprint_mismatch({"hidden_size": 32}, fp) == []
    assert fingerprint_mismatch({"hidden_size": 64}, fp) == ["hidden_size: prompt has 64, model has 32"]


def test_load_local_folder(tiny_model_dir):
    model, tok = load_base_model(str(tiny_model_dir), device="cpu")
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training and all(not m.training for m in model.modules())
    assert model.dtype == torch.float32 and model.device == CPU
    assert tok.pad_token == "[PAD]" and tok.pad_token_id == 0
    assert model.config._name_or_path == str(tiny_model_dir)
    # same weights as the in-memory model it was saved from
    assert fingerprint_mismatch(fingerprint(make_model("llama")), fingerprint(model)) == []
    assert fingerprint(model)["name_or_path"] == str(tiny_model_dir)


def test_load_dtype_and_pad_fallback(tmp_path):
    inner = Tokenizer(models.WordLevel(WORD_IDS, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=inner, eos_token="[EOS]", unk_token="[UNK]").save_pretrained(tmp_path)
    make_model("llama").save_pretrained(tmp_path)
    model, tok = load_base_model(str(tmp_path), device="cpu", dtype="bf16")
    assert model.dtype == torch.bfloat16
    assert tok.pad_token == "[EOS]" and tok.pad_token_id == 1  # no pad token saved: EOS stands in


def test_load_accepts_pathlike(tiny_model_dir):
    model, _ = load_base_model(tiny_model_dir, device="cpu")
    assert model.config.hidden_size == 32


@pytest.mark.parametrize("kind", ["missing", "not_a_model"])
def test_bad_path_names_flag_and_path(tmp_path, kind):
    path = tmp_path / "nope" if kind == "missing" else tmp_path
    if kind == "not_a_model":
        (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError) as exc:
        load_base_model(str(path), device="cpu")
    msg = str(exc.value)
    assert msg.startswith(f"--model {path}: could not load")
    assert "smollm2-135m-instruct" in msg  # points at what would work


def test_a_prompt_folder_given_as_the_model_is_named_as_such(tmp_path, tiny_model_dir):
    # transformers said only "Unrecognized model in DIR. Should have a `model_type` key in its config.json"
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING",
                                                              "base_model_name_or_path": "HuggingFaceTB/SmolLM2"}))
    with pytest.raises(ModelLoadError, match=re.escape(
            f"--model {tmp_path} is a prompt or adapter folder (adapter_config.json), not a model: give it as "
            "--prompt (or add it to a store) and its base model as --model (its adapter_config.json names "
            "'HuggingFaceTB/SmolLM2')")):
        load_base_model(str(tmp_path), device="cpu")
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"is a prompt or adapter folder \(adapter_config.json\), not a model: "
                                             r"give it as --prompt \(or add it to a store\) and its base model as "
                                             r"--model$"):
        load_base_model(str(tmp_path), device="cpu")


def test_damaged_weights_and_gguf_files_are_a_model_load_error(tmp_path, tiny_model_dir):
    import shutil
    import struct

    from softprompt.model import load_model_config

    folder = tmp_path / "cut"
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a download cut short
    with pytest.raises(ModelLoadError, match=rf"^--model {re.escape(str(folder))}: could not load \(\w*Error"):
        load_base_model(str(folder), device="cpu")
    gguf = tmp_path / "cut.gguf"  # header of a GGUF v3 file announcing 5 metadata entries, then nothing
    gguf.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 5) + b"\x01")
    for load in (lambda: load_model_config(str(gguf)), lambda: load_base_model(str(gguf), device="cpu")):
        with pytest.raises(ModelLoadError, match=rf"^--model {re.escape(str(gguf))}: could not"):
            load()


def test_an_unavailable_device_is_refused_before_any_weight_is_read(monkeypatch):
    import softprompt.model as model_mod

    monkeypatch.setattr(model_mod.torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelLoadError, match="--device cuda: .*use --device cpu"):
        model_mod.resolve_device("cuda")
    monkeypatch.setattr(model_mod.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(model_mod.torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ModelLoadError, match=re.escape("--device cuda:7: this machine has 1 CUDA device(s), "
                                                       "cuda:0 to cuda:0")):
        model_mod.resolve_device("cuda:7")
    assert model_mod.resolve_device("cuda:0") == torch.device("cuda:0")
    monkeypatch.setattr(model_mod.torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ModelLoadError, match="--device mps: MPS"):
        model_mod.resolve_device("mps")
    with pytest.raises(ConfigError, match="--device must be auto, cpu, cuda, cuda:N or mps, got 'cudax'"):
        ModelArgs(device="cudax")


def test_missing_gguf():
    with pytest.raises(ModelLoadError, match=r"^--model /no/such/x\.gguf: no such GGUF file$"):
        load_base_model("/no/such/x.gguf", device="cpu")


def test_resolve_dtype():
    assert resolve_dtype("auto", CPU) == torch.float32
    assert resolve_dtype("fp32", CPU) == torch.float32
    assert resolve_dtype("bfloat16", CPU) == torch.bfloat16 == resolve_dtype("bf16", CPU)
    assert resolve_dtype("fp16", CPU) == torch.float16
    with pytest.raises(ModelLoadError, match=r"--dtype 'int8' is not one of auto, float32, fp32, bfloat16"):
        resolve_dtype("int8", CPU)


@pytest.mark.slow
def test_embedded_default_model(monkeypatch):
    model, tok = load_base_model(device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM"
    cfg = model.config
    assert (cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers) == (576, 49152, 30)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert model.dtype == torch.float32
    assert tok.pad_token_id is not None
    fp = fingerprint(model)
    assert fp["name_or_path"] == "smollm2-135m-instruct" and fp["vocab_size"] == 49152
    enc = tok(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        new = forward.generate(model, enc["input_ids"], enc["attention_mask"], None, max_new_tokens=3,
                              eos_token_id=tok.eos_token_id)
    text = tok.decode(new[0])
    assert text.startswith(" Paris"), text  # observed greedy output: " Paris.\n\nThe answer is:"
    del model

    def no_conversion(*args, **kwargs):  # the second load reads the cached folder: nothing is de-quantised again
        raise AssertionError("the embedded model was converted again")

    import softprompt.model as model_mod

    monkeypatch.setattr(model_mod, "_convert_gguf", no_conversion)
    again, _ = load_base_model(device="cpu")
    assert fingerprint(again) == fp


def test_a_user_gguf_file_is_converted_once_and_cached_by_content(tmp_path, monkeypatch):
    """A .gguf path is de-quantised on its first load only; a copy loads from the cache, a changed file does not."""
    import shutil

    import softprompt.model as model_mod
    from tests.conftest import make_tokenizer

    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "cache"))
    conversions = []

    def fake_load_gguf(path, dtype):  # stands in for transformers' slow GGUF de-quantisation
        conversions.append(path.name)
        return make_model("llama"), make_tokenizer()

    monkeypatch.setattr(model_mod, "_load_gguf", fake_load_gguf)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(200)))
    first, tok = model_mod.load_base_model(gguf, device="cpu")
    again, _ = model_mod.load_base_model(gguf, device="cpu")
    shutil.copy(gguf, tmp_path / "copy.gguf")
    model_mod.load_base_model(tmp_path / "copy.gguf", device="cpu")
    assert conversions == ["m.gguf"]
    ids = torch.tensor([[3, 4, 5]])
    assert torch.equal(first(ids).logits, again(ids).logits)
    assert first.config._name_or_path == str(gguf) and tok.pad_token is not None
    gguf.write_bytes(b"GGUF" + bytes(range(201)))  # a new version of the file
    model_mod.load_base_model(gguf, device="cpu")
    assert conversions == ["m.gguf", "m.gguf"]


def test_processes_started_together_convert_a_gguf_once(tmp_path, monkeypatch):
    """torchrun on a fresh cache: every rank converted, and the last one replaced (or deleted) the folder another
    rank had published and was loading; the conversion now holds a lock, and the waiters find the folder."""
    import threading

    import softprompt.model as model_mod
    from tests.conftest import make_tokenizer

    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "cache"))
    conversions, started = [], threading.Event()

    def slow_load_gguf(path, dtype):
        conversions.append(path.name)
        started.set()
        time.sleep(0.5)  # the other rank arrives meanwhile
        return make_model("llama"), make_tokenizer()

    monkeypatch.setattr(model_mod, "_load_gguf", slow_load_gguf)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(200)))
    folders = []
    first = threading.Thread(target=lambda: folders.append(model_mod.materialize_gguf(gguf)))
    first.start()
    assert started.wait(30)
    folders.append(model_mod.materialize_gguf(gguf))
    first.join(30)
    assert conversions == ["m.gguf"] and folders[0] == folders[1] and (folders[0] / "config.json").exists()

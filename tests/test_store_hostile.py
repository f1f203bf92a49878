"""One bad stored file never hurts anything else (issue 9, store part).

Malformed ``softprompt.json`` fields, overwrites racing readers and crashes mid-overwrite, prompts that
overflow in the model's dtype, and symlinked files inside prompt folders: each is refused with a
:class:`StoreError` naming the file (and field), and the rest of the store keeps working.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from softprompt import cli
from softprompt.data import DataError, TaskFormat
from softprompt.engine import ClassifyRequest, Engine
from softprompt.methods import METHODS, build_method
from softprompt.store import (
    CONFIG_NAME,
    META_NAME,
    WEIGHTS_NAME,
    PromptStore,
    StoreError,
    atomic,
    check_model_compatible,
    load_prompt,
    save_prompt,
    snapshot,
)
from softprompt.store.entries import ENSEMBLE_FILE
from tests.conftest import make_model

P = 4
TASK = {"template": "Review: {text}\nSentiment:", "target_field": "label",
        "verbalizer": {"positive": "good", "negative": "bad"}}
OTHER_TASK = {"template": "Country: {text}\nCapital:", "target_field": "label",
              "verbalizer": {"positive": "great", "negative": "awful"}}


def prompt(model, tokenizer, seed: int = 0):
    return build_method("prompt_tuning", {"num_virtual_tokens": P, "init": "random", "seed": seed}, model,
                        tokenizer)


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def run_cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def set_in(section: str | None, key: str, value):
    def change(meta: dict) -> None:
        (meta[section] if section else meta)[key] = value
    return change


# (what is wrong, edit of softprompt.json, text the StoreError must contain after the file name)
MALFORMED = [
    ("dropout null", set_in("method_config", "dropout", None), "dropout"),
    ("vocab_sample_size string", set_in("method_config", "vocab_sample_size", "5"), "vocab_sample_size"),
    ("init_scale string", set_in("method_config", "init_scale", "big"), "init_scale"),
    ("seed float", set_in("method_config", "seed", 1.5), "seed"),
    ("template int", set_in("task", "template", 123),
     "task.template must be a string with at least one {field}, got 123"),
    ("template without field", set_in("task", "template", "Review: nothing"), "task.template"),
    ("template format spec", set_in("task", "template", "Review: {text:d}"), "task.template"),
    ("template conversion", set_in("task", "template", "Review: {text!r}"), "task.template"),
    ("template attribute", set_in("task", "template", "Review: {text.upper}"), "task.template"),
    ("template bad braces", set_in("task", "template", "Review: {text"), "task.template"),
    ("template uses target", set_in("task", "template", "Review: {label}"), "task.template"),
    ("target_prefix int", set_in("task", "target_prefix", 5), "task.target_prefix"),
    ("target_field list", set_in("task", "target_field", ["label"]), "task.target_field"),
    ("verbalizer list", set_in("task", "verbalizer", ["good", "bad"]), "task.verbalizer"),
    ("verbalizer text int", set_in("task", "verbalizer", {"positive": 1, "negative": "bad"}), "task.verbalizer"),
    ("verbalizer same texts", set_in("task", "verbalizer", {"positive": "ok", "negative": "ok"}),
     "task.verbalizer"),
    ("labels other set", set_in("task", "labels", ["yes", "no"]), "task.labels"),
    ("labels string", set_in("task", "labels", "positive"), "task.labels"),
    ("dataset int", set_in("task", "dataset", 7), "task.dataset"),
    ("train_config string", set_in(None, "train_config", "x"), "'train_config' must be an object or null, got str"),
    ("train_config.data list", set_in("train_config", "data", ["a.jsonl"]),
     "'train_config.data' must be an object or null, got list"),
    ("metrics list", set_in(None, "metrics", [0.5]), "'metrics' must be an object or null, got list"),
    ("fingerprint hash list", set_in("fingerprint", "embedding_sha256", ["x"]),
     "fingerprint.embedding_sha256 must be a string, got ['x']"),
    ("fingerprint fp16 hash dict", set_in("fingerprint", "embedding_sha256_fp16", {"a": 1}),
     "fingerprint.embedding_sha256_fp16 must be a string"),
    ("fingerprint hidden_size string", set_in("fingerprint", "hidden_size", "32"),
     "fingerprint.hidden_size must be a non-negative integer, got '32'"),
    ("fingerprint architecture list", set_in("fingerprint", "architecture", ["LlamaForCausalLM"]),
     "fingerprint.architecture must be a string"),
]
MALFORMED_IDS = [m[0] for m in MALFORMED]


@pytest.fixture
def store(tmp_path, model, tokenizer) -> PromptStore:
    """Entries good (classification) and bad (to be broken by a test), both valid when written."""
    s = PromptStore(tmp_path / "store", create=True)
    s.save("good", prompt(model, tokenizer, 1), model, task=TASK)
    s.save("bad", prompt(model, tokenizer, 2), model, task=TASK)
    return s


# ----- item 8: malformed softprompt.json ----------------------------------------------------------------


@pytest.mark.parametrize(("what", "change", "expected"), MALFORMED, ids=MALFORMED_IDS)
def test_malformed_meta_is_a_store_error_naming_file_and_field(store, what, change, expected):
    meta = store.path("bad") / META_NAME
    edit_json(meta, change)
    with pytest.raises(StoreError, match=re.escape(f"{meta}: ") + ".*" + re.escape(expected)):
        store.load("bad")
    listed = {e.name: e for e in store.list()}
    assert listed["bad"].kind == "broken" and str(meta) in listed["bad"].error and expected in listed["bad"].error
    assert listed["good"].kind == "prompt" and sorted(listed["good"].labels) == ["negative", "positive"]


def test_store_list_cli_lists_broken_and_the_rest(store):
    edit_json(store.path("bad") / META_NAME, set_in("task", "template", 123))
    rc, out, err = run_cli("store", "list", "--store", store.root)
    assert rc == 0 and "Traceback" not in err
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:] if not line.startswith("broken")}
    assert rows == {"bad": "broken", "good": "prompt"}
    assert f"broken bad: {store.path('bad') / META_NAME}: task.template must be a string" in out


def test_engine_from_store_skips_broken_entries_when_asked(store, model, tokenizer, caplog):
    meta = store.path("bad") / META_NAME
    edit_json(meta, set_in("task", "template", "Review: {text:d}"))
    with pytest.raises(StoreError, match=re.escape(f"{meta}: task.template")):
        Engine.from_store(store, model, tokenizer)
    with caplog.at_level(logging.WARNING):
        engine = Engine.from_store(store, model, tokenizer, skip_broken=True)
    assert engine.task_names() == ["good"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "'bad'" in warned[0] and f"{meta}: task.template" in warned[0]
    got = engine.classify([ClassifyRequest("good", "a good film")])[0]
    alone = Engine(model, tokenizer)  # the good prompt served on its own, not through from_store
    alone.add_prompt("good", store.load("good", model))
    ref = alone.classify([ClassifyRequest("good", "a good film")])
    assert got.label == ref[0].label and got.probs == pytest.approx(ref[0].probs, abs=1e-6)


@pytest.mark.parametrize("value", [["x"], {"sha": "x"}])
def test_a_malformed_fingerprint_breaks_its_entry_not_the_engine(store, model, tokenizer, value):
    meta = store.path("bad") / META_NAME
    edit_json(meta, set_in("fingerprint", "embedding_sha256", value))
    expected = re.escape(f"{meta}: fingerprint.embedding_sha256 must be a string")
    with pytest.raises(StoreError, match=expected):
        load_prompt(store.path("bad"), model)
    with pytest.raises(StoreError, match=expected):
        Engine.from_store(store, model, tokenizer)
    assert Engine.from_store(store, model, tokenizer, skip_broken=True).task_names() == ["good"]


def test_serve_skips_broken_entries_but_not_named_ones(store, tiny_model_dir, monkeypatch):
    import uvicorn

    from softprompt.server import assemble

    meta = store.path("bad") / META_NAME
    edit_json(meta, set_in("method_config", "dropout", None))
    states, served = [], []
    monkeypatch.setattr(assemble, "create_app", lambda state: states.append(state) or "app")
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.append(app))
    rc, _, err = run_cli("serve", "--model", tiny_model_dir, "--store", store.root)
    assert rc == 0 and served == ["app"] and "Traceback" not in err
    assert sorted(states[0].engine.task_names()) == ["base", "good"]
    rc, _, err = run_cli("serve", "--model", tiny_model_dir, "--store", store.root, "--tasks", "good,bad")
    assert rc == 2 and served == ["app"]
    assert f"{meta}: " in err and "dropout" in err and "Traceback" not in err


@pytest.mark.parametrize("change", [set_in("task", "template", "Review: {text:d}"),
                                    set_in("task", "verbalizer", ["good", "bad"]),
                                    set_in("method_config", "vocab_sample_size", "5")])
def test_eval_and_generate_report_malformed_files(store, tiny_model_dir, change):
    meta = store.path("bad") / META_NAME
    edit_json(meta, change)
    rc, _, err = run_cli("eval", "--prompt", store.path("bad"), "--model", tiny_model_dir)
    assert rc == 2 and err.startswith(f"softprompt eval: error: {meta}: ")
    rc, out, err = run_cli("generate", "--store", store.root, "--task", "bad", "--input", "a film",
                           "--model", tiny_model_dir)
    assert rc == 2 and out == "" and f"softprompt generate: error: {meta}: " in err


@pytest.mark.parametrize("template", ["Review: {text:d}", "Review: {text!r}", "Review: {text:>10}",
                                      "Review: {text!s:x}"])
def test_task_format_refuses_format_specs_and_conversions(template):
    with pytest.raises(DataError, match="placeholder"):
        TaskFormat(template, "label")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_configs_reject_wrong_types_with_a_message(method):
    cls = METHODS[method].config_class
    for name, value in cls().to_dict().items():
        bad = None if not isinstance(value, str) else 5
        with pytest.raises(ValueError, match=re.escape(name)):
            cls.from_dict({**cls().to_dict(), name: bad})
    assert cls.from_dict({**cls().to_dict(), "dropout": 0}).dropout == 0  # an int is a fine float


def test_old_valid_task_records_still_load(tmp_path, model, tokenizer):
    out = save_prompt(tmp_path / "p", prompt(model, tokenizer), model, task={"template": "{text}"})
    stored = load_prompt(out)
    assert stored.task_record.template == "{text}" and stored.task_record.verbalizer is None
    fmt = stored.task_record.format()
    assert (fmt.template, fmt.target_field, fmt.target_prefix, fmt.verbalizer) == ("{text}", "target", " ", None)
    edit_json(out / META_NAME, lambda m: m.__setitem__("task", {**TASK, "labels": ["negative", "positive"],
                                                                "dataset": "rotten_tomatoes", "note": 1}))
    record = load_prompt(out).task_record
    assert record.labels == ("negative", "positive") and list(record.verbalizer) == ["negative", "positive"]
    assert record.format().labels == ["negative", "positive"] and record.dataset == "rotten_tomatoes"
    assert save_prompt(tmp_path / "q", prompt(model, tokenizer), model, task=TASK)  # writers validate too
    with pytest.raises(StoreError, match=re.escape("task.template must be a string with at least one {field}")):
        save_prompt(tmp_path / "r", prompt(model, tokenizer), model, task={**TASK, "template": "no field"})


# ----- item 10: overwrites racing readers, crashes mid-overwrite ----------------------------------------


@pytest.fixture(params=["exchange", "two renames"])
def swap_mode(request, monkeypatch):
    """Run with the atomic exchange of the platform, and with the two-rename fallback."""
    if request.param == "two renames":
        monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    elif not atomic.exchange_supported():
        pytest.skip("no atomic exchange on this platform")
    return request.param


def test_overwrite_while_loading_never_fails_or_tears(store, model, tokenizer, swap_mode):
    methods = [prompt(model, tokenizer, 11), prompt(model, tokenizer, 12)]
    tasks = [TASK, OTHER_TASK]
    expected = [(m.saved_tensors()["prompt_embeddings"], t["template"]) for m, t in zip(methods, tasks, strict=True)]
    store.save("t", methods[0], model, task=tasks[0])
    stop, failures, loads = threading.Event(), [], [0]

    def reader() -> None:
        while not stop.is_set():
            try:
                got = store.load("t")
            except Exception as e:  # noqa: BLE001 - every failure is collected and reported
                failures.append(repr(e))
                continue
            pair = (got.tensors["prompt_embeddings"], got.task["template"])
            if not any(torch.equal(pair[0], t) and pair[1] == tpl for t, tpl in expected):
                failures.append(f"torn or unknown entry: template {pair[1]!r}")
            loads[0] += 1

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(60):
            store.save("t", methods[(i + 1) % 2], model, task=tasks[(i + 1) % 2], overwrite=True)
            time.sleep(0.001)
    finally:
        stop.set()
        thread.join(30)
    assert failures == [] and loads[0] > 0
    assert sorted(p.name for p in store.root.iterdir()) == ["bad", "good", "store.json", "t"]


class Crash(BaseException):
    """The process dies here: nothing after it runs, not even clean-up."""


def crash_at(monkeypatch, step: int) -> list[str]:
    """From the ``step``-th filesystem change on, every change raises :class:`Crash` (a dead process)."""
    calls: list[str] = []
    dead = [False]

    def hook(name, real):
        def fake(*args, **kwargs):
            if dead[0] or len(calls) == step:
                dead[0] = True
                raise Crash(name)
            calls.append(name)
            return real(*args, **kwargs)
        return fake

    for mod, name in ((os, "replace"), (os, "rename"), (os, "rmdir"), (shutil, "rmtree"), (atomic, "exchange")):
        monkeypatch.setattr(mod, name, hook(name, getattr(mod, name)))
    return calls


def test_crash_at_any_step_of_an_overwrite_leaves_a_loadable_entry(store, model, tokenizer, monkeypatch,
                                                                  swap_mode):
    old, new = prompt(model, tokenizer, 21), prompt(model, tokenizer, 22)
    old_t, new_t = (m.saved_tensors()["prompt_embeddings"] for m in (old, new))
    step, outcomes = 0, set()
    while True:
        store.save("t", old, model, task=TASK, overwrite="t" in store)
        with monkeypatch.context() as m:
            if swap_mode == "two renames":
                m.setattr(atomic, "exchange", lambda a, b: False)
            calls = crash_at(m, step)
            try:
                store.save("t", new, model, task=TASK, overwrite=True)
                finished = True
            except Crash:
                finished = False
        reopened = PromptStore(store.root)  # the next process: no manual fix
        got = reopened.load("t").tensors["prompt_embeddings"]
        assert torch.equal(got, old_t) or torch.equal(got, new_t), f"crash at step {step} ({calls})"
        outcomes.add("new" if torch.equal(got, new_t) else "old")
        assert reopened.names() == ["bad", "good", "t"]
        for leftover in store.root.glob(".*"):  # aged past any live writer: the next open removes them
            os.utime(leftover, (time.time() - 3600, time.time() - 3600))
        PromptStore(store.root)
        assert sorted(p.name for p in store.root.iterdir()) == ["bad", "good", "store.json", "t"], step
        if finished:
            break
        step += 1
    assert step >= 2 and outcomes == {"old", "new"}


def test_a_folder_replaced_while_being_read_is_read_again(store, model, tokenizer, monkeypatch):
    """The overwrite lands after the reader opened the folder: its files are gone, the new version is read."""
    new = prompt(model, tokenizer, 31)
    real_listdir, overwrites = os.listdir, []

    def overwrite_then_list(target):
        if not overwrites:
            overwrites.append("good")
            store.save("good", new, model, task=OTHER_TASK, overwrite=True)
        return real_listdir(target)

    monkeypatch.setattr(os, "listdir", overwrite_then_list)
    got = store.load("good")
    assert overwrites and got.task["template"] == OTHER_TASK["template"]
    assert torch.equal(got.tensors["prompt_embeddings"], new.saved_tensors()["prompt_embeddings"])


def test_readers_never_see_raw_os_errors(store, monkeypatch):
    real_open = os.open

    def vanishing_open(path, *args, **kwargs):
        if str(path).endswith(CONFIG_NAME):
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", vanishing_open)
    monkeypatch.setattr(snapshot, "READ_TRIES", 3)
    with pytest.raises(StoreError, match=re.escape(str(store.path("good")))):
        store.load("good")
    assert {e.name: e.kind for e in store.list()}["good"] == "broken"


# ----- item 11: finite in the model's dtype -------------------------------------------------------------


def test_prompt_overflowing_the_model_dtype_is_refused(tmp_path, model, tokenizer):
    method = prompt(model, tokenizer)
    with torch.no_grad():
        method.embeddings[0, 0] = 1e6  # finite in float32, inf in float16
    out = save_prompt(tmp_path / "p", method, model, task=TASK)
    assert load_prompt(out, model=model).tensors["prompt_embeddings"][0, 0] == 1e6  # fine for a float32 model
    assert load_prompt(out, model=make_model("llama").to(torch.bfloat16))  # bfloat16 holds 1e6
    half = make_model("llama").half()
    expected = re.escape(f"{out}: tensor 'prompt_embeddings' ") + ".*" + re.escape("torch.float16")
    with pytest.raises(StoreError, match=expected):
        load_prompt(out, model=half)
    with pytest.raises(StoreError, match=expected):
        check_model_compatible(load_prompt(out), half)


def test_a_float64_prompt_that_overflows_float32_is_refused(tmp_path, model, tokenizer):
    """The methods hold their parameters in float32: a float64 1e39 became Inf there and NaN scores in eval."""
    from safetensors.torch import load_file, save_file

    out = save_prompt(tmp_path / "p", prompt(model, tokenizer), model, task=TASK)
    tensors = {k: v.double() for k, v in load_file(out / WEIGHTS_NAME).items()}
    tensors["prompt_embeddings"][0, 0] = 1e39
    save_file(tensors, out / WEIGHTS_NAME)
    with pytest.raises(StoreError, match=re.escape(f"{out}: tensor 'prompt_embeddings' has values up to 1e+39 "
                                                   "that overflow to Inf in torch.float32")):
        load_prompt(out, model=model)


@pytest.mark.parametrize("where", ["softprompt.json", "PEFT folder"])
def test_a_prefix_cut_into_other_heads_than_the_models_is_refused_and_skipped(store, model, tokenizer, tmp_path,
                                                                               where):
    """Keys/values of the right total width, cut into other heads (a PEFT folder's num_attention_heads, our
    method_config): refused on load, naming both layouts; a store serves its other entries (it failed every
    request, and loaded first in name order it made the engine refuse the good entries)."""
    from softprompt.methods.prefix_tuning import kv_geometry
    from softprompt.store import export_peft

    assert kv_geometry(model) == (2, 2, 8)
    store.save("bad", build_method("prefix_tuning", {"num_virtual_tokens": P, "init": "random"}, model, tokenizer),
               model, task=TASK, overwrite=True)
    folder = store.path("bad")
    if where == "PEFT folder":
        folder = export_peft(folder, tmp_path / "peft")
        edit_json(folder / CONFIG_NAME, set_in(None, "num_attention_heads", 1))
    else:
        edit_json(folder / META_NAME, lambda meta: meta["method_config"].update(kv_heads=1, head_dim=16))
    with pytest.raises(StoreError, match=re.escape("(layers, key/value heads, head size) (2, 1, 16) but the "
                                                   "model's attention has (2, 2, 8)")):
        load_prompt(folder, model=model)
    if where == "softprompt.json":
        assert Engine.from_store(store, model, tokenizer, skip_broken=True).task_names() == ["good"]


@pytest.mark.parametrize(("name", "text", "why"), [
    (CONFIG_NAME, '{"num_virtual_tokens": ' + "1" * 5000 + "}", "Exceeds the limit (4300 digits)"),
    (META_NAME, "[" * 100000, "nested too deeply"),
], ids=["5000-digit int", "deep nesting"])
def test_json_that_cannot_become_a_value_makes_the_entry_broken_not_the_store(store, model, tokenizer, name, text,
                                                                                why):
    # under the size limit, yet json.loads raises a plain ValueError / RecursionError, not a JSONDecodeError
    (store.path("bad") / name).write_text(text)
    expected = re.escape(f"{store.path('bad') / name}: unreadable JSON ({why}")
    with pytest.raises(StoreError, match=expected):
        store.load("bad")
    assert {e.name: e.kind for e in store.list()} == {"bad": "broken", "good": "prompt"}
    assert Engine.from_store(store, model, tokenizer, skip_broken=True).task_names() == ["good"]


# ----- item 12: symlinked files inside prompt folders ---------------------------------------------------


@pytest.mark.parametrize("name", [WEIGHTS_NAME, CONFIG_NAME, META_NAME])
def test_symlinked_prompt_files_are_refused(store, tmp_path, name):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    entry = store.path("bad")
    shutil.move(entry / name, elsewhere / name)
    (entry / name).symlink_to(elsewhere / name)
    expected = re.escape(str(entry / name)) + ".*symbolic link"
    with pytest.raises(StoreError, match=expected):
        load_prompt(entry)
    with pytest.raises(StoreError, match=expected):
        store.load("bad")
    assert {e.name: e.kind for e in store.list()} == {"bad": "broken", "good": "prompt"}
    with pytest.raises(StoreError, match=expected):
        store.add("copy", entry)
    assert "copy" not in store


def test_symlinked_ensemble_file_is_refused(store, tmp_path):
    store.add_ensemble("ens", ["good", "bad"])
    path = store.path("ens") / ENSEMBLE_FILE
    shutil.move(path, tmp_path / ENSEMBLE_FILE)
    path.symlink_to(tmp_path / ENSEMBLE_FILE)
    with pytest.raises(StoreError, match=re.escape(str(path)) + ".*symbolic link"):
        store.ensemble("ens")
    assert {e.name: e.kind for e in store.list()}["ens"] == "broken"


@pytest.mark.parametrize("argv", [["remove", "good"], ["rename", "good", "better"]])
def test_store_remove_and_rename_that_the_os_refuses_exit_2_and_change_nothing(store, monkeypatch, argv):
    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", str(src))

    monkeypatch.setattr(os, "rename", refuse)
    rc, _, err = run_cli("store", argv[0], "--store", store.root, *argv[1:])
    assert rc == 2 and f"cannot {argv[0]} 'good'" in err and "Permission denied" in err, err
    monkeypatch.undo()
    assert sorted(e.name for e in store.list()) == ["bad", "good"]


def test_a_write_without_overwrite_never_replaces_a_folder_another_writer_placed_meanwhile(tmp_path):
    """Two `store add` of one name without --overwrite: the existence check passes for both; the second to place
    its folder must fail with 'already exists' and leave the first one's folder (it swapped them and deleted the
    first writer's folder, both reporting success)."""
    target = tmp_path / "entry"

    def write(tmp):
        (tmp / "mine.txt").write_text("second writer")
        target.mkdir()  # the other writer places its folder between the check and the rename
        (target / "theirs.txt").write_text("first writer")

    with pytest.raises(StoreError, match="already exists \\(written meanwhile by another process\\)"):
        atomic.write_folder_atomically(target, write, overwrite=False, replaceable=lambda p: True)
    assert sorted(p.name for p in target.iterdir()) == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]  # no temporary folder left


# ----- files that are not what they claim -----------------------------------------------------------------


def _peft_folder(folder: Path, config: dict, tensors: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir()
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    save_file(tensors, str(folder / WEIGHTS_NAME))


@pytest.mark.parametrize("case", ["float8 tensor", "init text a list", "heads Infinity"])
def test_hostile_peft_files_make_one_broken_entry_not_a_broken_store(store, model, tokenizer, case):
    """An 8-bit float tensor (NotImplementedError from isfinite), a list as PEFT's init text (AttributeError)
    and Infinity heads (OverflowError) escaped as non-StoreErrors: `store list` and `serve --store` failed whole."""
    h = model.config.hidden_size
    base = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 2, "token_dim": h}
    emb = torch.zeros(2, h)
    if case == "float8 tensor":
        config, tensors = base, {"prompt_embeddings": emb.to(torch.float8_e4m3fn)}
        why = "must be float16, bfloat16, float32 or float64, has dtype torch.float8_e4m3fn"
    elif case == "init text a list":
        config = {**base, "prompt_tuning_init": "TEXT", "prompt_tuning_init_text": ["x"]}
        tensors, why = {"prompt_embeddings": emb}, None
    else:
        cfg = model.config
        kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
        config = {**base, "peft_type": "PREFIX_TUNING", "token_dim": kv, "num_layers": cfg.num_hidden_layers,
                  "num_attention_heads": float("inf")}
        tensors = {"prompt_embeddings": torch.zeros(2, cfg.num_hidden_layers * 2 * kv)}
        why = "cannot convert float infinity to integer"
    _peft_folder(store.root / "hostile", config, tensors)
    listed = {e.name: e for e in store.list()}
    assert listed["good"].kind == "prompt"
    if why is None:  # a list is no init text: the prompt loads, its init recorded as random
        assert listed["hostile"].kind == "prompt" and store.load("hostile").method_config["init"] == "random"
        return
    assert listed["hostile"].kind == "broken" and why in listed["hostile"].error
    assert sorted(Engine.from_store(store, model, tokenizer, skip_broken=True).task_names()) == ["bad", "good"]


@pytest.mark.parametrize("name", [CONFIG_NAME, WEIGHTS_NAME, ENSEMBLE_FILE])
def test_a_named_pipe_in_an_entry_is_refused_not_waited_on(store, name):
    # opening a FIFO for reading blocks until a writer comes: store list, load and serve hung forever
    entry = store.root / "pipe"
    entry.mkdir()
    os.mkfifo(entry / name)
    done = threading.Event()
    listed = {}

    def listing():
        listed.update({e.name: e for e in store.list()})
        done.set()

    threading.Thread(target=listing, daemon=True).start()
    if not done.wait(20):
        with open(entry / name, "wb"):  # let the blocked reader go, so that the test process can end
            pass
        pytest.fail("store list blocked on a named pipe")
    assert listed["pipe"].kind == "broken" and "not a regular file" in listed["pipe"].error
    assert listed["good"].kind == "prompt"


def test_recovery_gives_up_on_a_rename_it_cannot_do_instead_of_spinning(tmp_path, monkeypatch):
    # a failed rename skipped the deadline: settle() looped at full speed for ever (a read-only store)
    from softprompt.store import swap

    aside = tmp_path / ".x.old-abcd1234"
    aside.mkdir()
    calls = []

    def refuse(src, dst):
        calls.append(1)
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(swap.os, "rename", refuse)
    t0 = time.monotonic()
    assert swap.settle(tmp_path / "x", timeout=0.3) is True
    assert time.monotonic() - t0 < 10 and 0 < len(calls) < 2000
    assert aside.is_dir()


def test_recovery_does_not_take_another_entrys_folders_for_an_old_copy(tmp_path):
    # ".x.old-1.tmp-k3j9abcd" is the half-written temporary folder of entry "x.old-1": it was put back as "x"
    from softprompt.store import swap

    other = tmp_path / ".x.old-1.tmp-k3j9abcd"
    other.mkdir()
    (other / CONFIG_NAME).write_text("{}")
    own = tmp_path / ".y.old-k3j9abcd"
    own.mkdir()
    os.utime(other, (0, 0))
    os.utime(own, (0, 0))
    assert swap.settle(tmp_path / "x", timeout=0.05) is False and other.is_dir() and not (tmp_path / "x").exists()
    assert swap.settle(tmp_path / "y", timeout=0.05) is True and (tmp_path / "y").is_dir()  # an old copy of y

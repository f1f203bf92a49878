"""PromptStore registry and its CLI verbs: layout, validation, ensembles, atomic changes, refusals."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from softprompt import cli_store
from softprompt.methods import build_method
from softprompt.model import fingerprint
from softprompt.store import (
    CONFIG_NAME,
    META_NAME,
    WEIGHTS_NAME,
    EnsembleSpec,
    PromptStore,
    StoreEntry,
    StoreError,
    export_peft,
    load_prompt,
    membership,
    save_prompt,
)
from softprompt.store import prompt_store as prompt_store_mod
from softprompt.store.entries import COMBINES
from tests.conftest import make_model

P, H = 4, 32
TASK = {"template": "Review: {text}\nSentiment:", "target_field": "label",
        "verbalizer": {"positive": "good", "negative": "bad"}}
GEN_TASK = {"template": "Country: {text}\nCapital:", "target_field": "capital", "verbalizer": None}
YES_NO = {**TASK, "verbalizer": {"yes": "good", "no": "bad"}}


def prompt(model, tokenizer, seed: int = 0):
    return build_method("prompt_tuning", {"num_virtual_tokens": P, "init": "random", "seed": seed}, model,
                        tokenizer)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def store(tmp_path) -> PromptStore:
    return PromptStore(tmp_path / "store", create=True)


@pytest.fixture
def filled(store, model, tokenizer) -> PromptStore:
    """Classification prompts a, b (same labels) and an ensemble ens of them."""
    store.save("a", prompt(model, tokenizer, 1), model, task=TASK, metrics={"accuracy": 0.5})
    store.save("b", prompt(model, tokenizer, 2), model, task=TASK)
    store.add_ensemble("ens", ["a", "b"], combine="vote")
    return store


def test_create_open_and_refuse_non_store(tmp_path):
    root = tmp_path / "new" / "store"
    with pytest.raises(StoreError, match=re.escape(f"{root}: not a prompt store (no store.json)")):
        PromptStore(root)
    assert not root.exists()
    store = PromptStore(root, create=True)
    assert store.root == root and listing(root) == ["store.json"]
    assert json.loads((root / "store.json").read_text()) == {"format": "softprompt-store", "version": 1}
    assert PromptStore(root).names() == [] and PromptStore(root, create=True).root == root

    empty = tmp_path / "empty"
    empty.mkdir()
    PromptStore(empty, create=True)  # an empty folder may become a store
    assert listing(empty) == ["store.json"]

    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("precious")
    with pytest.raises(StoreError, match=re.escape(f"{home}: a non-empty folder without store.json")):
        PromptStore(home, create=True)
    assert listing(home) == ["notes.txt"]


def test_a_store_another_process_is_creating_meanwhile_is_created_and_opened(tmp_path, monkeypatch):
    root, real_replace, calls, opened = tmp_path / "store", os.replace, [], []

    def replace_after_another_creator(src, dst):  # B starts while A's marker is still its temporary file
        calls.append(Path(src).name)
        if Path(dst).name == "store.json" and len(calls) == 1:
            assert [p.name for p in root.iterdir()] == [Path(src).name]
            opened.append(PromptStore(root, create=True))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_after_another_creator)
    first = PromptStore(root, create=True)
    assert opened[0].root == first.root == root and listing(root) == ["store.json"]
    assert len(calls) == 2 and calls[0] != calls[1]  # B wrote its own marker, A's landed after it


def test_a_store_created_by_another_process_after_this_one_looked_for_it_is_opened(tmp_path, monkeypatch):
    other, real_iterdir = tmp_path / "other", Path.iterdir
    other.mkdir()

    def iterdir_after_another_creator(self):  # A places the marker after B looked for it, before B lists
        if self == other and not (other / "store.json").exists():
            (other / "store.json").write_text(json.dumps({"format": "softprompt-store", "version": 1}))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir_after_another_creator)
    assert PromptStore(other, create=True).names() == [] and listing(other) == ["store.json"]


@pytest.mark.parametrize(("marker", "expected"), [
    ({"format": "other", "version": 1}, "not a softprompt store marker"),
    ({"format": "softprompt-store", "version": 2}, "store version 2 was written by a newer softprompt"),
    ({"format": "softprompt-store", "version": "1"}, "'version' must be a positive integer"),
])
def test_refuses_bad_marker(tmp_path, marker, expected):
    (tmp_path / "store.json").write_text(json.dumps(marker))
    with pytest.raises(StoreError, match=re.escape(f"{tmp_path / 'store.json'}: {expected}")):
        PromptStore(tmp_path)


def test_save_add_list_show_load_round_trip(store, model, tokenizer, tmp_path):
    method = prompt(model, tokenizer, 1)
    path = store.save("sentiment", method, model, task=TASK, train_config={"lr": 0.3},
                      metrics={"test": {"accuracy": 0.75}})
    assert path == store.root / "sentiment"
    gen = prompt(model, tokenizer, 2)
    src = save_prompt(tmp_path / "outside", gen, model, task=GEN_TASK)
    (src / "notes.txt").write_text("not copied")
    assert store.add("capitals", src) == store.root / "capitals"
    assert listing(store.root / "capitals") == sorted([CONFIG_NAME, WEIGHTS_NAME, META_NAME])
    assert listing(store.root) == ["capitals", "sentiment", "store.json"]  # no temporary folders left

    assert store.names() == ["capitals", "sentiment"]
    assert "sentiment" in store and "nope" not in store and "../sentiment" not in store
    entries = store.list()
    created = json.loads((store.root / "sentiment" / META_NAME).read_text())["created"]
    assert entries[1] == StoreEntry(name="sentiment", kind="prompt", method="prompt_tuning", num_virtual_tokens=P,
                                    template=TASK["template"], labels=["negative", "positive"], members=None,
                                    combine=None, metrics={"test": {"accuracy": 0.75}}, created=created,
                                    path=store.root / "sentiment")
    assert entries[0].name == "capitals" and entries[0].labels is None and entries[0].template == GEN_TASK["template"]

    info = store.show("sentiment")
    assert info["name"] == "sentiment" and info["kind"] == "prompt" and info["path"] == str(path)
    assert info["task"] == {**TASK, "target_prefix": None} and info["train_config"] == {"lr": 0.3}
    assert info["fingerprint"] == fingerprint(model) and info["method_config"]["num_virtual_tokens"] == P
    assert info["adapter_config"]["peft_type"] == "PROMPT_TUNING" and info["adapter_config"]["token_dim"] == H

    for name, m in (("sentiment", method), ("capitals", gen)):
        stored = store.load(name, model=model)
        assert stored.path == store.root / name
        assert torch.equal(stored.tensors["prompt_embeddings"], m.embeddings.detach())
        assert torch.equal(stored.build_method()().embeds, m.embeddings.detach())


def test_show_names_the_entry_whatever_keys_its_files_carry(filled):
    for entry, file in (("a", META_NAME), ("ens", "ensemble.json")):
        data = json.loads((filled.path(entry) / file).read_text())
        (filled.path(entry) / file).write_text(json.dumps({**data, "name": "impostor", "path": "/elsewhere",
                                                           **({"kind": "ensemble"} if entry == "a" else {})}))
    info = filled.show("a")
    assert (info["name"], info["path"], info["kind"]) == ("a", str(filled.root / "a"), "prompt")
    assert list(info)[:3] == ["name", "path", "kind"] and info["method"] == "prompt_tuning"
    info = filled.show("ens")
    assert (info["name"], info["path"], info["kind"], info["members"]) == ("ens", str(filled.root / "ens"),
                                                                          "ensemble", ["a", "b"])


def test_add_refuses_existing_and_invalid_source(store, model, tokenizer, tmp_path):
    src = save_prompt(tmp_path / "src", prompt(model, tokenizer), model, task=TASK)
    store.add("a", src)
    before = files(store.root / "a")
    with pytest.raises(StoreError, match="entry 'a' already exists; pass overwrite=True"):
        store.add("a", src)
    safetensors.torch.save_file({"prompt_embeddings": torch.full((P, H), float("nan"))}, str(src / WEIGHTS_NAME))
    with pytest.raises(StoreError, match=re.escape(f"{src / WEIGHTS_NAME}: ") + ".*NaN"):
        store.add("a", src, overwrite=True)
    with pytest.raises(StoreError, match="no such prompt folder"):
        store.add("b", tmp_path / "missing")
    assert files(store.root / "a") == before and listing(store.root) == ["a", "store.json"]


def test_add_peft_folder(store, model, tokenizer, tmp_path):
    method = prompt(model, tokenizer, 3)
    ours = save_prompt(tmp_path / "ours", method, model, task=TASK)
    peft_dir = export_peft(ours, tmp_path / "peft")
    store.add("from_peft", peft_dir)
    assert listing(store.root / "from_peft") == sorted([CONFIG_NAME, WEIGHTS_NAME])
    (entry,) = store.list()
    assert (entry.kind, entry.method, entry.num_virtual_tokens, entry.labels, entry.created, entry.metrics) == \
        ("prompt", "prompt_tuning", P, None, None, {})
    assert torch.equal(store.load("from_peft", model=model).tensors["prompt_embeddings"], method.embeddings.detach())
    info = store.show("from_peft")
    assert info["method"] == "prompt_tuning" and info["method_config"]["num_virtual_tokens"] == P
    assert "fingerprint" not in info and info["adapter_config"]["peft_type"] == "PROMPT_TUNING"


@pytest.mark.parametrize("bad", ["../x", "a/b", ".x", "", "-x"])
def test_unsafe_names_refused(filled, model, tokenizer, tmp_path, bad):
    src = save_prompt(tmp_path / "src", prompt(model, tokenizer), model, task=TASK)
    before = listing(tmp_path)
    calls = [
        lambda: filled.save(bad, prompt(model, tokenizer), model, task=TASK),
        lambda: filled.add(bad, src),
        lambda: filled.add_ensemble(bad, ["a", "b"]),
        lambda: filled.path(bad),
        lambda: filled.load(bad),
        lambda: filled.show(bad),
        lambda: filled.remove(bad),
        lambda: filled.rename("a", bad),
        lambda: filled.rename(bad, "z"),
        lambda: filled.export(bad, tmp_path / "out"),
    ]
    for call in calls:
        with pytest.raises(StoreError, match="invalid task name"):
            call()
    assert bad not in filled
    assert listing(tmp_path) == before and filled.names() == ["a", "b", "ens"]


def test_hidden_and_stray_items_are_not_entries(filled):
    (filled.root / ".a.tmp-123").mkdir()
    (filled.root / ".hidden").mkdir()
    (filled.root / "README.txt").write_text("notes")
    (filled.root / "has space").mkdir()
    assert filled.names() == ["a", "b", "ens"] and [e.name for e in filled.list()] == ["a", "b", "ens"]


def test_load_refuses_other_base_model(filled):
    other = make_model(seed=1)
    with pytest.raises(StoreError, match=re.escape(f"{filled.root / 'a'}: the prompt was trained on a different "
                                                   "base model")):
        filled.load("a", model=other)
    assert filled.load("a", model=other, check_fingerprint=False).tensors["prompt_embeddings"].shape == (P, H)


def test_ensemble_entry(filled):
    assert listing(filled.root / "ens") == ["ensemble.json"]
    data = json.loads((filled.root / "ens" / "ensemble.json").read_text())
    assert data == {"kind": "ensemble", "members": ["a", "b"], "combine": "vote", "created": data["created"]}
    assert data["created"].endswith("+00:00")
    assert filled.ensemble("ens") == EnsembleSpec(name="ens", members=["a", "b"], combine="vote")
    entry = filled.list()[2]
    assert (entry.kind, entry.members, entry.combine, entry.labels, entry.method, entry.template) == \
        ("ensemble", ["a", "b"], "vote", ["negative", "positive"], None, TASK["template"])
    assert filled.show("ens") == {"name": "ens", "path": str(filled.root / "ens"), **data}
    with pytest.raises(StoreError, match="'ens' is an ensemble, not a prompt"):
        filled.load("ens")
    with pytest.raises(StoreError, match="'a' is a prompt, not an ensemble"):
        filled.ensemble("a")
    with pytest.raises(StoreError, match="'ens' is an ensemble, not a prompt"):
        filled.export("ens", filled.root.parent / "out")
    assert not (filled.root.parent / "out").exists()


@pytest.mark.parametrize(("members", "combine", "expected"), [
    (["a", "nope"], "mean", "member 'nope': .*no entry 'nope'"),
    (["a"], "mean", "an ensemble needs at least 2 members, got 1"),
    (["a", "a"], "mean", "members repeated: a"),
    (["a", "ens"], "mean", "member 'ens' is an ensemble; members must be prompts"),
    (["a", "b", "yn"], "mean", re.escape("members have different label sets (a, b: ['negative', 'positive']; "
                                         "yn: ['no', 'yes'])")),
    (["a", "gen"], "mean", re.escape("a: ['negative', 'positive']; gen: generation (no verbalizer)")),
    (["gen", "gen_b"], "mean", "member 'gen' has no labels .*member 'gen_b' has no labels"),
    (["a", "b"], "max", "combine must be one of mean, vote, got 'max'"),
    (["a", "other_model"], "mean", "members were trained on different base models"),
])
def test_ensemble_validation(filled, model, tokenizer, members, combine, expected):
    filled.save("yn", prompt(model, tokenizer), model, task=YES_NO)
    filled.save("gen", prompt(model, tokenizer), model, task=GEN_TASK)
    filled.save("gen_b", prompt(model, tokenizer, 1), model, task=GEN_TASK)
    other = make_model(seed=1)
    filled.save("other_model", prompt(other, tokenizer), other, task=TASK)
    before = listing(filled.root)
    with pytest.raises(StoreError, match=re.escape(f"{filled.root / 'new'}: cannot add ensemble: ") + f".*{expected}"):
        filled.add_ensemble("new", members, combine=combine)
    assert listing(filled.root) == before


def test_an_ensemble_of_one_checkpoint_loaded_other_ways_is_one_base_model(filled, model, tokenizer):
    # fingerprints as load compares a prompt with the model: name_or_path ignored, one shared embedding hash enough
    elsewhere = make_model(seed=0)
    elsewhere.config._name_or_path = "/abs/m"
    filled.save("path", prompt(model, tokenizer, 3), elsewhere, task=TASK)
    for dtype in (torch.bfloat16, torch.float16):
        filled.save(str(dtype).split(".")[1], prompt(model, tokenizer, 4), make_model(seed=0).to(dtype), task=TASK)
    filled.save("old", prompt(model, tokenizer, 5), model, task=TASK)
    meta = json.loads((filled.path("old") / META_NAME).read_text())
    del meta["fingerprint"]["embedding_sha256_fp16"]  # written before the fp16 hash existed
    (filled.path("old") / META_NAME).write_text(json.dumps(meta))
    filled.add_ensemble("same", ["a", "path", "bfloat16", "old"])
    # a bf16 and an fp16 load of an fp32 checkpoint share no hash; the fp32 member links them, in any order
    filled.add_ensemble("linked", ["bfloat16", "float16", "a"])
    assert filled.ensemble("linked").members == ["bfloat16", "float16", "a"]
    with pytest.raises(StoreError, match="members were trained on different base models than 'bfloat16' "
                                         r"\(float16: embedding_sha256: "):
        filled.add_ensemble("unlinked", ["bfloat16", "float16"])
    other = make_model(seed=1)
    filled.save("other", prompt(other, tokenizer), other, task=TASK)
    with pytest.raises(StoreError, match=r"different base models than 'a' \(other: embedding_sha256: "):
        filled.add_ensemble("mixed", ["a", "path", "other"])


def test_overwriting_a_member_with_a_prompt_of_another_base_model_is_refused(filled, model, tokenizer, tmp_path):
    other = make_model(seed=1)
    src = save_prompt(tmp_path / "other", prompt(other, tokenizer), other, task=TASK)
    before = files(filled.root / "a")
    expected = "replacing 'a' would break ensemble 'ens': members were trained on different base models than 'b'"
    with pytest.raises(StoreError, match=re.escape(expected)):
        filled.add("a", src, overwrite=True)
    with pytest.raises(StoreError, match=re.escape(expected)):
        filled.save("a", prompt(other, tokenizer), other, task=TASK, overwrite=True)
    assert files(filled.root / "a") == before
    same = make_model(seed=0).to(torch.bfloat16)  # the same base model, loaded in another dtype: fine
    filled.add("a", save_prompt(tmp_path / "same", prompt(model, tokenizer, 6), same, task=TASK), overwrite=True)
    assert filled.load("a").fingerprint == fingerprint(same)


def test_ensemble_problems_reported_together(filled):
    with pytest.raises(StoreError) as e:
        filled.add_ensemble("new", ["ens"], combine="max")
    msg = str(e.value)
    assert "combine must be one of" in msg and "at least 2 members" in msg and "'ens' is an ensemble" in msg


def test_replacing_entries(filled, model, tokenizer):
    filled.add_ensemble("ens", ["b", "a"], combine="mean", overwrite=True)
    assert filled.ensemble("ens") == EnsembleSpec("ens", ["b", "a"], "mean")
    with pytest.raises(StoreError, match="entry 'ens' already exists"):
        filled.add_ensemble("ens", ["a", "b"])
    filled.save("c", prompt(model, tokenizer, 3), model, task=TASK)
    with pytest.raises(StoreError, match="entry 'a' is of kind 'prompt', not 'ensemble'; remove it first"):
        filled.add_ensemble("a", ["b", "c"], overwrite=True)
    with pytest.raises(StoreError, match="entry 'ens' is of kind 'ensemble', not 'prompt'; remove it first"):
        filled.save("ens", prompt(model, tokenizer), model, task=TASK, overwrite=True)
    before = files(filled.root / "a")
    with pytest.raises(StoreError, match="replacing 'a' would break ensemble 'ens': members have different label"):
        filled.save("a", prompt(model, tokenizer, 5), model, task=YES_NO, overwrite=True)
    assert files(filled.root / "a") == before
    new = prompt(model, tokenizer, 5)
    filled.save("a", new, model, task=TASK, overwrite=True)  # same labels: fine
    assert torch.equal(filled.load("a").tensors["prompt_embeddings"], new.embeddings.detach())


def test_remove(filled, monkeypatch):
    with pytest.raises(StoreError, match="'a' is a member of ensemble\\(s\\) ens"):
        filled.remove("a")
    assert filled.names() == ["a", "b", "ens"]
    real_rmtree, seen = shutil.rmtree, []

    def rmtree(path, *args, **kwargs):  # by the time files are deleted, the entry is already gone
        seen.append((Path(path).parent, Path(path).name, filled.names()))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(prompt_store_mod.shutil, "rmtree", rmtree)
    filled.remove("ens")
    filled.remove("a")
    assert [(parent, name.startswith("."), names) for parent, name, names in seen] == \
        [(filled.root, True, ["a", "b"]), (filled.root, True, ["b"])]
    assert listing(filled.root) == ["b", "store.json"]
    with pytest.raises(StoreError, match="no entry 'a' \\(entries: b\\)"):
        filled.remove("a")


def test_rename_updates_ensembles(filled, model, tokenizer):
    filled.save("c", prompt(model, tokenizer, 3), model, task=TASK)
    filled.add_ensemble("ens2", ["c", "a"])
    tensors = filled.load("a").tensors["prompt_embeddings"]
    assert filled.rename("a", "a2") == filled.root / "a2"
    assert filled.names() == ["a2", "b", "c", "ens", "ens2"]
    assert filled.ensemble("ens").members == ["a2", "b"] and filled.ensemble("ens2").members == ["c", "a2"]
    assert json.loads((filled.root / "ens" / "ensemble.json").read_text())["combine"] == "vote"
    assert torch.equal(filled.load("a2").tensors["prompt_embeddings"], tensors)
    assert not [p for p in filled.root.rglob(".*")]  # no temporary files
    filled.rename("ens", "both")
    assert filled.ensemble("both").members == ["a2", "b"]

    before = {n: files(filled.root / n) for n in filled.names()}
    with pytest.raises(StoreError, match="cannot rename 'a2' to 'b': 'b' already exists"):
        filled.rename("a2", "b")
    with pytest.raises(StoreError, match="no entry 'zz'"):
        filled.rename("zz", "yy")
    assert {n: files(filled.root / n) for n in filled.names()} == before


def test_rename_rolls_back_when_an_ensemble_cannot_be_rewritten(filled, model, tokenizer, monkeypatch):
    filled.add_ensemble("ens2", ["b", "a"])
    before = {n: files(filled.root / n) for n in filled.names()}
    real_write, calls = membership.write_json, []

    def flaky(path, data):
        if Path(path).parent != filled.root:  # an ensemble file, not the journal
            calls.append(Path(path).parent.name)
            if len(calls) == 2:  # the first ensemble is rewritten, the second fails
                raise OSError("disk full")
        return real_write(path, data)

    monkeypatch.setattr(membership, "write_json", flaky)
    with pytest.raises(OSError, match="disk full"):
        filled.rename("a", "a2")
    assert calls[:2] == ["ens", "ens2"]
    assert filled.names() == ["a", "b", "ens", "ens2"]
    assert {n: files(filled.root / n) for n in filled.names()} == before
    assert not [p for p in filled.root.rglob(".*")]  # the journal too


_KILLED_RENAME = """
import os, sys
from softprompt.store import PromptStore, membership
real = membership.replace_json
def die_at_the_second_ensemble(path, data, seen=[]):
    if path.name == "ensemble.json":
        seen.append(path)
        if len(seen) == 2:
            os._exit(9)  # killed: no rollback, no cleanup
    return real(path, data)
membership.replace_json = die_at_the_second_ensemble
PromptStore(sys.argv[1]).rename("a", "a2")
"""


def test_a_rename_killed_between_the_folder_and_the_ensembles_is_completed_when_the_store_opens(filled):
    # it left ens2 listing 'a', gone for good: the ensemble was broken in every later listing and served nothing
    filled.add_ensemble("ens2", ["b", "a"])
    done = subprocess.run([sys.executable, "-c", _KILLED_RENAME, str(filled.root)], capture_output=True, text=True)
    assert done.returncode == 9, done.stderr
    assert (filled.root / membership.JOURNAL).is_file() and (filled.root / "a2").is_dir()
    store = PromptStore(filled.root)
    assert store.ensemble("ens").members == ["a2", "b"] and store.ensemble("ens2").members == ["b", "a2"]
    assert {e.name: e.kind for e in store.list()} == {"a2": "prompt", "b": "prompt", "ens": "ensemble",
                                                     "ens2": "ensemble"}
    assert not [p for p in filled.root.rglob(".*")]


def test_a_journal_of_a_rename_that_never_moved_the_folder_or_a_torn_one_changes_nothing(filled):
    before = {n: files(filled.root / n) for n in filled.names()}
    for journal in ('{"old": "a", "new": "a2"}', '{"old": "a"', "[]"):
        (filled.root / membership.JOURNAL).write_text(journal)
        store = PromptStore(filled.root)
        assert {n: files(store.root / n) for n in store.names()} == before
        assert not (filled.root / membership.JOURNAL).exists()


def test_removing_a_member_waits_for_an_ensemble_being_added_and_then_refuses(filled, model, tokenizer, monkeypatch):
    # remove() checked the ensembles while add_ensemble() was between validating 'c' and writing: the new
    # ensemble listed 'c', removed meanwhile
    filled.save("c", prompt(model, tokenizer, 3), model, task=TASK)
    validated, removal = threading.Event(), {}
    real_load = PromptStore.load

    def slow_load(self, name, *a, **k):
        out = real_load(self, name, *a, **k)
        if name == "c" and threading.current_thread() is threading.main_thread():
            validated.set()
            time.sleep(0.5)  # the other thread's remove() runs now, unless it waits for the lock
        return out

    def remove():
        validated.wait()
        try:
            PromptStore(filled.root).remove("c")
        except StoreError as e:
            removal["error"] = str(e)

    monkeypatch.setattr(PromptStore, "load", slow_load)
    other = threading.Thread(target=remove)
    other.start()
    filled.add_ensemble("ens2", ["a", "c"])
    other.join()
    assert "'c' is a member of ensemble(s) ens2" in removal.get("error", ""), removal
    assert filled.entry("ens2").members == ["a", "c"]


def test_export_both_ways(filled, tmp_path):
    stored = filled.load("a")
    ours = filled.export("a", tmp_path / "ours")
    assert ours == (tmp_path / "ours").absolute() and files(ours) == files(filled.root / "a")
    back = load_prompt(ours)
    assert torch.equal(back.tensors["prompt_embeddings"], stored.tensors["prompt_embeddings"])
    assert back.meta == stored.meta

    peft_dir = filled.export("a", tmp_path / "peft", peft=True)
    assert listing(peft_dir) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    back = load_prompt(peft_dir)
    assert back.meta == {} and torch.equal(back.tensors["prompt_embeddings"], stored.tensors["prompt_embeddings"])
    for peft in (False, True):
        with pytest.raises(StoreError, match="already exists"):
            filled.export("a", ours, peft=peft)
    assert load_prompt(ours).meta == stored.meta


@pytest.mark.parametrize("peft", [False, True])
def test_export_refuses_a_destination_inside_the_store(filled, peft):
    # exported into the store, a copy became a broken entry, or a stray folder inside entry 'a'; with
    # --overwrite it replaced entry 'b' behind the store's back (ensemble 'ens' lists it)
    before = {p.relative_to(filled.root): p.read_bytes() for p in filled.root.rglob("*") if p.is_file()}
    for dest, overwrite in ((filled.root / "c", False), (filled.root / "a" / "inner", False),
                            (filled.root / "b", True), (filled.root, True)):
        with pytest.raises(StoreError, match=re.escape(f"{dest}: is inside the store {filled.root}; export copies")):
            filled.export("a", dest, peft=peft, overwrite=overwrite)
    assert {p.relative_to(filled.root): p.read_bytes() for p in filled.root.rglob("*") if p.is_file()} == before


def test_broken_entries_are_listed(filled):
    (filled.root / "bad").mkdir()
    (filled.root / "bad" / CONFIG_NAME).write_text("{not json")
    (filled.root / "empty").mkdir()
    shutil.rmtree(filled.root / "b")  # behind the store's back: ens loses a member
    entries = {e.name: e for e in filled.list()}
    assert [(n, e.kind) for n, e in entries.items()] == \
        [("a", "prompt"), ("bad", "broken"), ("empty", "broken"), ("ens", "broken")]
    assert entries["bad"].error == f"{filled.root / 'bad'}: missing {WEIGHTS_NAME}"
    assert entries["empty"].error == f"{filled.root / 'empty'}: missing {WEIGHTS_NAME}"
    assert entries["ens"].error == f"{filled.root / 'ens' / 'ensemble.json'}: member(s) b missing from the store"
    assert entries["bad"].path == filled.root / "bad" and entries["bad"].method is None
    ens_file = filled.root / "ens" / "ensemble.json"
    ens_file.write_text(json.dumps({"kind": "ensemble", "members": "a", "combine": "sum"}))
    err = {e.name: e.error for e in filled.list()}["ens"]
    assert "'members' must be a list of at least 2 names" in err and "'combine' must be one of mean, vote" in err
    for members, expected in ((["a", "a"], "'members' has repeated names: ['a', 'a']"),
                              (["a", "../b"], "'members' has invalid task names: ['../b']")):
        ens_file.write_text(json.dumps({"kind": "ensemble", "members": members, "combine": "mean"}))
        assert {e.name: e.error for e in filled.list()}["ens"] == f"{ens_file}: {expected}"
    with pytest.raises(StoreError, match="invalid task names"):
        filled.ensemble("ens")


@pytest.mark.parametrize("overwrite", [False, True])
def test_interrupted_add_leaves_no_partial_entry(store, model, tokenizer, tmp_path, monkeypatch, overwrite):
    src = save_prompt(tmp_path / "src", prompt(model, tokenizer, 7), model, task=TASK)
    if overwrite:
        store.save("task", prompt(model, tokenizer, 1), model, task=TASK)
        before = files(store.root / "task")
    real_copy, copied = prompt_store_mod.write_bytes, []

    def copy_then_fail(b, data):
        if copied:
            raise OSError("disk full")
        copied.append(b)
        return real_copy(b, data)

    monkeypatch.setattr(prompt_store_mod, "write_bytes", copy_then_fail)
    with pytest.raises(StoreError, match=re.escape("writing it failed (disk full)")):
        store.add("task", src, overwrite=overwrite)  # a StoreError: the CLI's exit 2 with the cause, no traceback
    assert len(copied) == 1 and not Path(copied[0]).exists()  # the partial copy was written, then removed
    assert listing(store.root) == (["store.json", "task"] if overwrite else ["store.json"])
    if overwrite:
        assert files(store.root / "task") == before


def test_add_validates_the_copy(store, model, tokenizer, tmp_path, monkeypatch):
    """What lands in the store is validated, not only the source (which may change while being copied)."""
    src = save_prompt(tmp_path / "src", prompt(model, tokenizer), model, task=TASK)
    real_copy = prompt_store_mod.write_bytes

    def corrupting_copy(b, data):
        real_copy(b, data)
        if Path(b).name == WEIGHTS_NAME:
            Path(b).write_bytes(b"\xff" * 16)

    monkeypatch.setattr(prompt_store_mod, "write_bytes", corrupting_copy)
    with pytest.raises(StoreError, match="not a readable safetensors file"):
        store.add("task", src)
    assert listing(store.root) == ["store.json"]


# ----- CLI -----------------------------------------------------------------------------------------------


def run(capsys, *argv: str) -> str:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    cli_store.add_store_parsers(sub)
    ns = parser.parse_args(argv)
    assert ns.func(ns) == 0
    return capsys.readouterr().out


def test_cli_verbs(model, tokenizer, tmp_path, capsys):
    root = str(tmp_path / "store")
    src = save_prompt(tmp_path / "src", prompt(model, tokenizer), model, task=TASK,
                      metrics={"validation": {"val_accuracy": 0.5}, "test": {"accuracy": 0.625}})
    out = run(capsys, "store", "add", "sentiment", str(src), "--store", root)
    assert out == f"added sentiment (prompt_tuning, {P} virtual tokens, labels negative,positive) at " \
                  f"{tmp_path / 'store' / 'sentiment'}\n"
    run(capsys, "store", "add", "second", str(src), "--store", root)
    out = run(capsys, "ensemble", "--store", root, "--name", "both", "--members", "sentiment, second,",
              "--combine", "vote")
    assert out == f"added ensemble both = vote of sentiment, second at {tmp_path / 'store' / 'both'}\n"

    out = run(capsys, "store", "list", "--store", root)
    lines = out.splitlines()
    assert [line.split() for line in lines] == [
        ["NAME", "KIND", "METHOD", "TOKENS", "LABELS", "METRIC"],
        ["both", "ensemble", "vote(sentiment,second)", "-", "negative,positive", "-"],
        ["second", "prompt", "prompt_tuning", "4", "negative,positive", "test.accuracy=0.6250"],
        ["sentiment", "prompt", "prompt_tuning", "4", "negative,positive", "test.accuracy=0.6250"],
    ]
    starts = {line.index(word) for line, word in zip(lines, ["KIND", "ensemble", "prompt", "prompt"], strict=True)}
    assert len(starts) == 1  # aligned columns

    rows = json.loads(run(capsys, "store", "list", "--store", root, "--json"))
    assert [r["name"] for r in rows] == ["both", "second", "sentiment"]
    assert rows[2]["path"] == str(tmp_path / "store" / "sentiment") and rows[2]["num_virtual_tokens"] == P
    assert rows[0]["members"] == ["sentiment", "second"] and rows[0]["combine"] == "vote"

    info = json.loads(run(capsys, "store", "show", "sentiment", "--store", root))
    assert info["name"] == "sentiment" and info["task"]["verbalizer"] == TASK["verbalizer"]

    out = run(capsys, "store", "rename", "second", "other", "--store", root)
    assert out == "renamed second to other (updated ensembles: both)\n"
    out = run(capsys, "store", "export", "other", str(tmp_path / "peft"), "--peft", "--store", root)
    assert out == f"exported other to {tmp_path / 'peft'} (PEFT format)\n"
    assert listing(tmp_path / "peft") == sorted([CONFIG_NAME, WEIGHTS_NAME])
    run(capsys, "store", "export", "other", str(tmp_path / "ours"), "--store", root)
    assert META_NAME in listing(tmp_path / "ours")
    # an existing destination (the error names --overwrite, which the export verb lacked): replaced with it
    (tmp_path / "empty").mkdir()
    for dest, peft in ((tmp_path / "peft", []), (tmp_path / "ours", ["--peft"]), (tmp_path / "empty", [])):
        with pytest.raises(StoreError, match=re.escape(f"{dest} already exists; pass overwrite=True (CLI --overwrite")):
            run(capsys, "store", "export", "other", str(dest), *peft, "--store", root)
        run(capsys, "store", "export", "other", str(dest), *peft, "--overwrite", "--store", root)
        assert (META_NAME in listing(dest)) == (not peft)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep")
    with pytest.raises(StoreError, match="does not look like a stored prompt"):
        run(capsys, "store", "export", "other", str(tmp_path / "notes"), "--overwrite", "--store", root)
    assert listing(tmp_path / "notes") == ["todo.txt"]

    with pytest.raises(StoreError, match="member of ensemble"):
        run(capsys, "store", "remove", "other", "--store", root)
    assert run(capsys, "store", "remove", "both", "--store", root) == f"removed both from {tmp_path / 'store'}\n"
    run(capsys, "store", "remove", "other", "--store", root)
    assert [r["name"] for r in json.loads(run(capsys, "store", "list", "--store", root, "--json"))] == ["sentiment"]


def test_cli_errors_and_broken_listing(tmp_path, capsys):
    with pytest.raises(StoreError, match="not a prompt store"):
        run(capsys, "store", "list", "--store", str(tmp_path / "none"))
    store = PromptStore(tmp_path / "s", create=True)
    assert run(capsys, "store", "list", "--store", str(store.root)) == f"{store.root}: no entries\n"
    (store.root / "bad").mkdir()
    out = run(capsys, "store", "list", "--store", str(store.root))
    assert out.splitlines()[1].split() == ["bad", "broken", "-", "-", "-", "-"]
    assert out.splitlines()[2] == f"broken bad: {store.root / 'bad'}: missing {WEIGHTS_NAME}"
    with pytest.raises(StoreError, match="--members ','"):
        run(capsys, "ensemble", "--store", str(store.root), "--name", "e", "--members", ",")
    with pytest.raises(SystemExit):
        run(capsys, "store", "list")  # --store is required
    assert cli_store.COMBINES == COMBINES


@pytest.mark.parametrize(("metrics", "expected"), [
    ({}, "-"),
    ({"accuracy": 0.5, "loss": 1.0}, "accuracy=0.5000"),
    ({"loss": 2.0}, "loss=2.0000"),
    ({"validation": {"val_accuracy": 0.5}, "test": {"accuracy": 0.75}}, "test.accuracy=0.7500"),
    ({"validation": {"val_exact_match": 0.25, "val_loss": 1.5}, "test": None}, "validation.val_exact_match=0.2500"),
    ({"accuracy": None, "f1": float("nan"), "note": "x"}, "-"),
])
def test_headline_metric(metrics, expected):
    assert cli_store.headline_metric(metrics) == expected


def test_eval_refuses_an_ensemble_whose_members_have_other_templates(store, model, tokenizer, tmp_path, capsys):
    # the test split is rendered once, with the first member's template, and sent as it is to every member: the
    # others were scored on text they were not trained on and the report was not what the server serves
    from softprompt.cli import main

    d = tmp_path / "tiny"
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    store.save("a", prompt(model, tokenizer, 1), model, task={**TASK, "dataset": "rotten_tomatoes"})
    store.save("b", prompt(model, tokenizer, 2), model,
               task={**TASK, "template": "Classify : {text} .", "dataset": "rotten_tomatoes"})
    store.add_ensemble("ens", ["a", "b"])
    assert main(["eval", "--model", str(d), "--store", str(store.root), "--task", "ens"]) == 2
    err = capsys.readouterr().err
    assert "ensemble 'ens': its members were trained with different templates" in err and "b: 'Classify" in err

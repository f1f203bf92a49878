"""Hostile flags (issue 9): bad numbers, paths and prompt lengths are refused up front with exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from softprompt.cli import main
from softprompt.store import PromptStore
from tests import test_cli
from tests.conftest import make_model, make_tokenizer
from tests.test_cli import TEMPLATE, _assert_usage_error, run, train_argv

env = test_cli.env  # the tiny model folders and jsonl files (a module fixture)


def _no_work(monkeypatch):
    """Make building a method (and so any training) fail loudly: a refusal must come before it."""
    import softprompt.methods as methods

    def refuse(*args, **kwargs):
        raise AssertionError("a method was built: the arguments were not refused up front")

    monkeypatch.setattr(methods, "build_method", refuse)


@pytest.mark.parametrize(("extra", "needles"), [
    (["--lr", "inf"], ["--lr must be a finite number, got inf"]),
    (["--weight-decay", "nan"], ["--weight-decay must be a finite number, got nan"]),
    (["--max-grad-norm=-inf", "--init-scale", "inf", "--prompt-dropout", "nan"],
     ["--max-grad-norm must be a finite number", "--init-scale must be a finite number",
      "--prompt-dropout must be a finite number"]),
    (["--seed", "-1", "--data-seed", "99999999999"], ["--seed must be in 0..4294967295",
                                                       "--data-seed must be in 0..4294967295"]),
])
def test_train_refuses_non_finite_and_out_of_range_numbers(env, tmp_path, monkeypatch, extra, needles):
    _no_work(monkeypatch)
    err = _assert_usage_error(train_argv(env, tmp_path / "o", *extra), *needles)
    assert err.count("softprompt train: error") == 1
    assert not (tmp_path / "o").exists()


def test_train_refuses_output_dir_and_store_that_are_files(env, tmp_path, monkeypatch):
    _no_work(monkeypatch)
    afile = tmp_path / "afile"
    afile.write_text("x")
    err = _assert_usage_error(train_argv(env, afile, "--store", afile / "store", "--task", "t"),
                              f"--output-dir {afile}: exists and is not a folder",
                              f"--store {afile / 'store'}: {afile} is not a folder")
    assert err.count("softprompt train: error") == 1  # both in one message
    assert afile.read_text() == "x"


@pytest.mark.parametrize("extra, needle", [
    (["--store", "S"], "--store and --task go together"),
    (["--task", "t"], "--store and --task go together"),
    (["--store", "S", "--task", "../up"], "task name"),
])
def test_train_refuses_a_store_without_a_task_and_an_unsafe_task_name(env, tmp_path, monkeypatch, extra, needle):
    _no_work(monkeypatch)
    extra = [str(tmp_path / x) if x == "S" else x for x in extra]
    _assert_usage_error(train_argv(env, tmp_path / "o", *extra), needle)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("drop", "split", "needle"), [
    ("--validation-file", ["--split", "validation"], "--split validation: the final evaluation reads it, and this "
                                                     "task has no 'validation' split (have: train, test)"),
    ("--test-file", ["--split", "test"], "--split test: the final evaluation reads it, and this task has no 'test' "
                                         "split (have: train, validation)"),
    ("--test-file", ["--config", "C"], "--split test: the final evaluation reads it"),
])
def test_train_refuses_a_split_the_task_lacks_before_training(env, tmp_path, monkeypatch, drop, split, needle):
    """``--split`` naming a split the task does not have was trained for, then its evaluation skipped in silence."""
    _no_work(monkeypatch)
    (tmp_path / "C").write_text("eval:\n  split: test\n")  # given in --config, though equal to the default
    argv = [str(a) for a in train_argv(env, tmp_path / "o", *[str(tmp_path / x) if x == "C" else x for x in split])]
    at = argv.index(drop)
    del argv[at:at + 2]
    if drop == "--validation-file":
        del argv[argv.index("--eval-every"):argv.index("--eval-every") + 2]  # acts on validation only
    _assert_usage_error(argv, needle)
    assert not (tmp_path / "o").exists()


def test_yaml_values_are_refused_naming_the_file_and_key(env, tmp_path, monkeypatch):
    _no_work(monkeypatch)
    cfg = tmp_path / "run.yaml"
    for text, needle in ((".inf", "train.lr must be a finite number, got inf"),
                         ("abc", "train.lr: expected float, got 'abc'"),
                         ("[1]", "train.lr: expected float, got [1]")):
        cfg.write_text(f"train:\n  lr: {text}\n  weight_decay: .nan\n")
        _assert_usage_error([*train_argv(env, tmp_path / "o"), "--config", cfg], f"{cfg}: {needle}",
                            f"{cfg}: train.weight_decay must be a finite number, got nan")
    assert not (tmp_path / "o").exists()


def test_malformed_numbers_stay_argparse_usage_errors(env, tmp_path, capsys):
    for extra in (["--lr", "fast"], ["--batch-size", "1.5"], ["--num-virtual-tokens", "1e9"]):
        with pytest.raises(SystemExit) as exc:
            main([str(a) for a in train_argv(env, tmp_path / "o", *extra)])
        assert exc.value.code == 2
        assert extra[0] in capsys.readouterr().err


def test_prompt_longer_than_the_context_is_refused_before_any_work(env, tmp_path, monkeypatch):
    _no_work(monkeypatch)
    for p in ("300", "100000"):
        _assert_usage_error(train_argv(env, tmp_path / "o", "--num-virtual-tokens", p),
                            f"--num-virtual-tokens {p}", "256 positions (max_position_embeddings)",
                            "--num-virtual-tokens must be at most 248")
    _assert_usage_error(train_argv(env, tmp_path / "o", "--num-virtual-tokens", "100", "--max-length", "200"),
                        "--num-virtual-tokens 100 + --max-length 200 = 300 tokens", "context of 256",
                        "156 are left for text")
    assert not (tmp_path / "o").exists()  # nothing written either


def test_default_max_length_is_lowered_to_what_fits(env, tmp_path):
    out = tmp_path / "o"
    rc, _, stderr = run(train_argv(env, out, "--num-virtual-tokens", "200", "--init", "random", "--max-steps", "1",
                                   "--baselines", "no_prompt"))
    assert rc == 0, stderr
    assert "--max-length 56" in stderr
    from softprompt.config import load_yaml

    assert load_yaml(out / "config.yaml")["data"]["max_length"] == 56


@pytest.fixture(scope="module")
def long_prompt(tmp_path_factory) -> Path:
    """A stored 300-token prompt for the tiny 256-position model (as if trained on a longer-context sibling)."""
    from softprompt.methods import build_method
    from softprompt.store import save_prompt

    model = make_model("llama")
    method = build_method("prompt_tuning", {"num_virtual_tokens": 300, "init": "random"}, model, make_tokenizer())
    task = {"template": TEMPLATE, "target_field": "label", "verbalizer": {"positive": "positive",
                                                                          "negative": "negative"}}
    return save_prompt(tmp_path_factory.mktemp("long") / "prompt", method, model, task=task)


def test_stored_prompt_too_long_for_the_model_is_refused(env, long_prompt, tmp_path):
    needles = [str(long_prompt), "300 virtual tokens", "context of 256 positions (max_position_embeddings)"]
    _assert_usage_error(["generate", "--model", env["model"], "--prompt", long_prompt, "--input", "good"], *needles)
    _assert_usage_error(["eval", "--model", env["model"], "--prompt", long_prompt, "--test-file", env["test"]],
                        *needles)
    store = tmp_path / "store"
    assert run(["store", "add", "--store", store, "long", long_prompt])[0] == 0
    _assert_usage_error(["generate", "--model", env["model"], "--store", store, "--task", "long", "--input", "x"],
                        "300 virtual tokens", "context of 256")


def test_eval_report_path_checked_before_work(env, tmp_path, monkeypatch):
    import softprompt.workflows.evaluation as evaluation

    monkeypatch.setattr(evaluation, "load_model_from_args",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    afile = tmp_path / "afile"
    afile.write_text("x")
    _assert_usage_error(["eval", "--model", env["model"], "--prompt", tmp_path, "--report", afile / "r.json"],
                        f"--report {afile / 'r.json'}: {afile} is not a folder")
    _assert_usage_error(["eval", "--model", env["model"], "--prompt", tmp_path, "--report", tmp_path],
                        f"--report {tmp_path}: is a folder")


def test_generate_sampling_flags_checked_together(env, tmp_path):
    err = _assert_usage_error(["generate", "--model", env["model"], "--input", "good", "--temperature", "nan",
                               "--top-p", "0", "--top-k", "-2", "--max-new-tokens", "0", "--seed", "-5"],
                              "--temperature must be a finite number", "--top-p must be in (0, 1]",
                              "--top-k must be >= 0", "--max-new-tokens must be >= 1", "--seed must be in")
    assert err.count("softprompt generate: error") == 1
    # sampling flags at the default --temperature 0 (greedy) changed nothing, in silence
    _assert_usage_error(["generate", "--model", tmp_path / "no-model", "--input", "good", "--top-k", "50",
                         "--seed", "3"], "--top-k, --seed only apply when sampling: --temperature is 0")
    # --raw with --messages was silently ignored
    _assert_usage_error(["generate", "--model", env["model"], "--messages", '[{"role": "user", "content": "hi"}]',
                         "--raw"], "--raw applies to --input text")
    # --prompt beside --store/--task was silently ignored (the store won), found after the model loaded;
    # the model path here does not exist: refused before anything is loaded
    for extra in (["--prompt", tmp_path, "--store", tmp_path, "--task", "t"], ["--store", tmp_path]):
        _assert_usage_error(["generate", "--model", tmp_path / "no-model", "--input", "good", *extra],
                            "--prompt DIR and --store DIR --task NAME both name the prompt" if "--prompt" in extra
                            else "--store needs --task NAME")


def test_generate_reads_the_named_prompt_before_the_model(tmp_path):
    """A missing or damaged --prompt folder, or an unknown --store entry, was found once the model had loaded
    (minutes for a large one). The model path here does not exist: the prompt's error comes first."""
    no_model, broken = tmp_path / "no-model", tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    base = ["generate", "--model", no_model, "--input", "good"]
    _assert_usage_error([*base, "--prompt", tmp_path / "missing"], str(tmp_path / "missing"))
    _assert_usage_error([*base, "--prompt", broken], f"{broken}: missing adapter_model.safetensors")
    store = PromptStore(tmp_path / "store", create=True).root
    err = _assert_usage_error([*base, "--store", store, "--task", "nope"], "no entry 'nope'")
    assert str(no_model) not in err


def test_compare_refuses_bad_flags_and_too_short_context(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    _assert_usage_error(["compare", "--model", tmp_path, "--steps", "0", "--output-dir", afile],
                        "--steps must be >= 1", f"--output-dir {afile}: exists and is not a folder")
    short = tmp_path / "short"
    model = make_model("llama")
    model.config.max_position_embeddings = 24
    model.save_pretrained(short)
    make_tokenizer().save_pretrained(short)
    _assert_usage_error(["compare", "--model", short, "--only", "prompt_tuning", "--output-dir", tmp_path / "c"],
                        "P=20", "20 virtual tokens", "context of 24 positions")
    assert not (tmp_path / "c").exists()


def test_store_destinations_under_a_file_are_refused_with_exit_2(env, long_prompt, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    # the store itself, an export, and a PEFT export: each path runs through a file
    _assert_usage_error(["store", "add", "--store", afile / "store", "p", long_prompt],
                        f"{afile / 'store'}: cannot create a prompt store there")
    store = tmp_path / "store"
    assert run(["store", "add", "--store", store, "p", long_prompt])[0] == 0
    for extra in ([], ["--peft"]):
        _assert_usage_error(["store", "export", "--store", store, "p", afile / "out", *extra],
                            f"{afile / 'out'}: cannot create it there")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "store"] and afile.read_text() == "x"


@pytest.mark.parametrize(("world", "needle"), [("abc", "WORLD_SIZE='abc' is not a process count"),
                                                ("2", "WORLD_SIZE=2 but the process group cannot start")])
def test_a_malformed_launch_environment_is_exit_2_before_anything_is_written(env, tmp_path, monkeypatch, world,
                                                                              needle):
    """WORLD_SIZE='' or 'abc' was a ValueError traceback, WORLD_SIZE=2 outside torchrun a traceback from
    init_process_group, both after --output-dir and config.yaml were written."""
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", world)
    _assert_usage_error(["train", "--model", env["model"], "--train-file", env["train"], "--output-dir",
                         tmp_path / "out"], needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("command", "drop_verbalizer", "metric", "needle"), [
    ("train", True, "accuracy", "--metric accuracy is not measured on a generation task: use exact_match, f1, loss"),
    ("train", False, "exact_match", "--metric exact_match is not measured on a classification task: use accuracy"),
    ("tune", True, "macro_f1", "--metric macro_f1 is not measured on a generation task"),
])
def test_a_metric_the_task_does_not_measure_is_refused_before_any_work(env, tmp_path, monkeypatch, command,
                                                                        drop_verbalizer, metric, needle):
    # train raised KeyError at the first validation; tune trained every trial's first rung, then called each
    # one diverged ("non-finite validation accuracy None") and exited 1
    _no_work(monkeypatch)
    argv = train_argv(env, tmp_path / "o", "--metric", metric)
    argv[0] = command
    if drop_verbalizer:
        i = argv.index("--verbalizer")
        del argv[i:i + 2]
    _assert_usage_error(argv, needle)
    assert not (tmp_path / "o" / "best_prompt").exists()


def test_a_validation_target_longer_than_max_length_is_refused_before_training(env, tmp_path):
    """It stopped the run at its first validation, --eval-every steps in (exit 2 naming no split)."""
    import json

    words = "the movie was great plot a film is".split()
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": w, "label": "good"}) + "\n" for w in words))
    (tmp_path / "v.jsonl").write_text(json.dumps({"text": "the", "label": "good"}) + "\n"
                                      + json.dumps({"text": "a", "label": " ".join(words * 3)}) + "\n")
    rc, _, err = run(["train", "--model", env["model"], "--train-file", tmp_path / "t.jsonl", "--validation-file",
                      tmp_path / "v.jsonl", "--template", TEMPLATE, "--target-field", "label", "--max-length", "16",
                      "--num-virtual-tokens", "2", "--max-steps", "4", "--eval-every", "2", "--output-dir",
                      tmp_path / "o"])
    assert rc == 2 and "validation split: v.jsonl line 2: target ' the movie was great" in err, err
    assert not (tmp_path / "o" / "metrics.jsonl").exists() or not (tmp_path / "o" / "metrics.jsonl").read_text()


@pytest.mark.parametrize(("flag_name", "needle"), [("--verbalizer", "--verbalizer is empty"),
                                                   ("--template", "--template is empty"),
                                                   ("--train-file", "--train-file is empty")])
def test_an_empty_flag_value_is_refused_not_read_as_not_given(env, tmp_path, monkeypatch, flag_name, needle):
    # --verbalizer "" (an unset shell variable) fell back to the stored/built-in value: with files, a
    # classification task silently became a generation task; --train-file "" became Path("") ('.')
    _no_work(monkeypatch)
    argv = train_argv(env, tmp_path / "o")
    argv[argv.index(flag_name) + 1] = ""
    _assert_usage_error(argv, needle)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("extra", "needle"), [
    (["--early-stopping-patience", "3"], "--early-stopping-patience 3: it acts on the validation split, and this "
                                         "task has none"),
    (["--stop-when-flat", "0.02"], "--stop-when-flat 0.02: it acts on the validation split"),
    (["--metric", "loss"], "--metric loss: it acts on the validation split"),
    (["--eval-every", "2"], "--eval-every 2: it acts on the validation split")])
def test_train_refuses_validation_flags_on_a_task_without_validation(env, tmp_path, monkeypatch, extra, needle):
    """They were accepted and did nothing: no validation ran, so nothing stopped early or was selected by them."""
    _no_work(monkeypatch)
    base = ["train", "--model", env["model"], "--train-file", env["train"], "--template", TEMPLATE,
            "--target-field", "label", "--verbalizer", "positive=positive,negative=negative", "--max-steps", "2",
            "--output-dir", tmp_path / "o"]
    _assert_usage_error([*base, *extra], needle, "give --validation-file FILE, or leave it out")
    assert not (tmp_path / "o").exists()


def test_a_path_that_is_not_utf8_prints_escaped_under_a_strict_utf8_stdout(tiny_model_dir, tmp_path):
    """A file name of non-UTF-8 bytes reaches Python as surrogate escapes; printing it to a strict UTF-8 stdout
    raised UnicodeEncodeError: ``inspect`` printed nothing, ``store export`` crashed after writing the folder (a
    retry then said 'already exists'). Printed with backslash escapes, exit 0."""
    from softprompt.methods import build_method
    from softprompt.store import PromptStore

    model = make_model("llama")  # the weights of tiny_model_dir
    store = PromptStore(tmp_path / "store", create=True)
    store.save("p", build_method("prompt_tuning", {"num_virtual_tokens": 2, "init": "random"}, model,
                                 make_tokenizer()), model)
    dest = tmp_path / os.fsdecode(b"out\xff")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict",
           "PYTHONPATH": str(test_cli.REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for argv in (["store", "export", "p", dest, "--store", store.root], ["inspect", dest, "--model", tiny_model_dir]):
        proc = subprocess.run([sys.executable, "-m", "softprompt", *map(str, argv)], capture_output=True, text=True,
                              errors="surrogateescape", cwd=test_cli.REPO, env=env, timeout=300)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        assert str(tmp_path / "out\\udcff") in proc.stdout
    assert (dest / "adapter_model.safetensors").is_file()

"""End-to-end tests of the ``softprompt`` command on a tiny local model folder.

Most runs call :func:`softprompt.cli.main` in-process (fast); one runs ``python -m softprompt`` as a real
subprocess to check the exit status the shell sees.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from softprompt.cli import main
from softprompt.config import load_yaml
from softprompt.store import PromptStore, load_prompt
from tests.conftest import make_model, make_tokenizer, sentiment_records, write_jsonl

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = "Review: {text}\nSentiment:"
# made of words of the tiny vocabulary (tests/conftest.py WORDS): unknown words would all become [UNK]
INIT_TEXT = "Classify the sentiment positive negative ."
TABLE_ROWS = ["no soft prompt (template only)", "init text as hard prompt", "4-shot prompting", "tuned soft prompt"]


def run(argv: list[str]) -> tuple[int, str, str]:
    """Run the CLI in-process; return (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    """Two tiny model folders (different weights) and jsonl train/validation/test files."""
    d = tmp_path_factory.mktemp("cli")
    paths = {"model": d / "tiny", "other_model": d / "tiny-seed1"}
    for key, seed in (("model", 0), ("other_model", 1)):
        make_model("llama", seed=seed).save_pretrained(paths[key])
        make_tokenizer().save_pretrained(paths[key])
    paths["train"] = write_jsonl(d / "train.jsonl", sentiment_records(32, seed=0))
    paths["validation"] = write_jsonl(d / "validation.jsonl", sentiment_records(8, seed=1))
    paths["test"] = write_jsonl(d / "test.jsonl", sentiment_records(8, seed=2))
    paths["root"] = d
    return paths


def train_argv(env: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["train", "--model", env["model"], "--train-file", env["train"], "--validation-file",
            env["validation"], "--test-file", env["test"], "--template", TEMPLATE, "--target-field", "label",
            "--verbalizer", "positive=positive,negative=negative", "--num-virtual-tokens", "4",
            "--batch-size", "4", "--eval-every", "2", "--output-dir", out, *extra]


@pytest.fixture(scope="module")
def trained(env) -> tuple[Path, str]:
    """One full ``train`` run (all baselines); returns (output dir, stdout)."""
    out = env["root"] / "run"
    rc, stdout, stderr = run(train_argv(env, out, "--max-steps", "4", "--init-text", INIT_TEXT))
    assert rc == 0, stderr
    return out, stdout


def test_train_prints_report_and_writes_run_folder(trained):
    out, stdout = trained
    assert "task: " in stdout and "train=32  validation=8  test=8" in stdout
    assert "trained 4 steps" in stdout and "; best validation accuracy " in stdout  # names what it selects by
    assert "test split (8 examples):" in stdout
    for row in TABLE_ROWS:
        assert row in stdout
    for name in ("prompt", "best", "last"):
        for f in ("adapter_model.safetensors", "adapter_config.json", "softprompt.json"):
            assert (out / name / f).is_file(), f"{name}/{f}"
    assert (out / "checkpoint").is_dir()
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert "val_accuracy" in rows[1] and "val_accuracy" not in rows[0]  # --eval-every 2
    report = json.loads((out / "eval.json").read_text())
    assert list(report) == TABLE_ROWS
    assert all(report[k]["n"] == 8 for k in report)
    cfg = load_yaml(out / "config.yaml")
    assert cfg["train"]["max_steps"] == 4 and cfg["train"]["batch_size"] == 4
    assert cfg["prompt"]["init_text"] == INIT_TEXT and cfg["data"]["template"] == TEMPLATE
    weights = load_file(str(out / "prompt" / "adapter_model.safetensors"))
    assert weights["prompt_embeddings"].shape == (4, 32)
    meta = json.loads((out / "prompt" / "softprompt.json").read_text())
    # the task is stored with the prompt, so eval/generate need no data flags
    assert meta["task"]["template"] == TEMPLATE and meta["task"]["target_field"] == "label"
    assert meta["task"]["verbalizer"] == {"positive": "positive", "negative": "negative"}
    assert meta["metrics"]["test"] == report["tuned soft prompt"]


def test_a_template_flag_reads_backslash_n_as_a_newline(env, tmp_path):
    # a shell passes "Review: {text}\nSentiment:" (the README's example) with a backslash and an n: the prompt
    # read as one line with them in it; a config file's template is read alike (a single-quoted YAML template
    # kept the backslash), and --print-config writes one that reads back the same
    typed = "Review: {text}\\nSentiment:\\t\\\\x"  # what the shell hands over
    rc, stdout, stderr = run(["train", "--train-file", env["train"], "--template", typed, "--target-field", "label",
                              "--print-config"])
    assert rc == 0, stderr
    cfg = tmp_path / "t.yaml"
    cfg.write_text(stdout)
    assert load_yaml(cfg)["data"]["template"] == "Review: {text}\nSentiment:\t\\x"
    cfg.write_text("data:\n  template: 'Review: {text}\\nSentiment:'\n")  # single-quoted YAML
    rc, stdout, _ = run(["train", "--config", cfg, "--train-file", env["train"], "--target-field", "label",
                         "--print-config"])
    assert rc == 0 and yaml.safe_load(stdout)["data"]["template"] == "Review: {text}\nSentiment:"


def test_config_file_precedence_and_print_config(env, tmp_path):
    out = tmp_path / "cfg-run"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"model": str(env["model"])},
        "data": {"train_file": str(env["train"]), "template": TEMPLATE, "target_field": "label"},
        "prompt": {"init": "random", "num_virtual_tokens": 3},
        "train": {"max_steps": 2, "batch_size": 4, "lr": 0.1, "output_dir": str(out)},
        "eval": {"baselines": []},
    }))
    rc, stdout, stderr = run(["train", "--config", cfg, "--batch-size", "3", "--print-config"])
    assert rc == 0, stderr
    printed = tmp_path / "printed.yaml"
    printed.write_text(stdout)
    back = load_yaml(printed)
    assert back["train"]["batch_size"] == 3  # the flag wins over the file
    assert back["train"]["max_steps"] == 2 and back["train"]["lr"] == 0.1  # the file wins over defaults
    assert back["prompt"]["num_virtual_tokens"] == 3 and back["train"]["epochs"] == 1  # default
    assert not out.exists()  # --print-config does nothing else
    # the printed config is itself a complete config file: it resolves to the same text
    rc, stdout2, _ = run(["train", "--config", printed, "--print-config"])
    assert rc == 0 and stdout2 == stdout
    # and a real run follows it
    rc, stdout, stderr = run(["train", "--config", cfg, "--batch-size", "3"])
    assert rc == 0, stderr
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert load_yaml(out / "config.yaml")["train"]["batch_size"] == 3
    assert "tuned soft prompt" not in stdout  # no test split given, and the default --split test: trained, not
    assert "no test split: the prompt was not evaluated" in stdout  # evaluated, and it says so


def test_eval_uses_stored_task_and_writes_report(env, trained, tmp_path):
    out, _ = trained
    report_path = tmp_path / "report.json"
    rc, stdout, stderr = run(["eval", "--model", env["model"], "--prompt", out / "prompt", "--test-file",
                              env["test"], "--report", report_path])
    assert rc == 0, stderr
    assert f"test split (8 examples), prompt {out / 'prompt'}:" in stdout
    for row in ("no soft prompt (template only)", "init text as hard prompt", "tuned soft prompt"):
        assert row in stdout
    assert "4-shot prompting" not in stdout  # no train split, so no shots to draw
    report = json.loads(report_path.read_text())
    # same prompt, same test file, and the stored template/verbalizer: the numbers of the train run's report
    train_report = json.loads((out / "eval.json").read_text())
    assert set(report) == {"no soft prompt (template only)", "init text as hard prompt", "tuned soft prompt"}
    for name, metrics in report.items():
        assert metrics == pytest.approx(train_report[name], rel=1e-6, abs=1e-6)


def _generate(env, prompt: Path, *extra) -> tuple[int, list[dict], str]:
    rc, stdout, stderr = run(["generate", "--model", env["model"], "--prompt", prompt, *extra])
    return rc, [json.loads(line) for line in stdout.splitlines() if line.strip()], stderr


def test_generate_fills_a_template_of_several_fields_from_a_json_input(env, tmp_path):
    from softprompt.methods import build_method
    from softprompt.store import save_prompt

    model = make_model("llama")
    method = build_method("prompt_tuning", {"num_virtual_tokens": 2, "init": "random"}, model, make_tokenizer())
    task = {"template": "Country : {country} plot : {plot} Capital :", "target_field": "capital", "verbalizer": None}
    folder = save_prompt(tmp_path / "p", method, model, task=task)
    rc, rows, stderr = _generate(env, folder, "--input", '{"country": "France", "plot": "good"}',
                                 "--max-new-tokens", "2")
    assert rc == 0, stderr
    assert rows[0]["input"] == "Country : France plot : good Capital :"
    # plain text cannot fill two fields: the flag is named with an example, before any generation
    _assert_usage_error(["generate", "--model", env["model"], "--prompt", folder, "--input", "France"],
                        "task 'prompt''s template has fields ['country', 'plot']: give a JSON object of strings",
                        '{"country": "...", "plot": "..."}')
    rc, rows, _ = _generate(env, folder, "--input", "Country : Spain", "--raw", "--max-new-tokens", "1")
    assert rc == 0 and rows[0]["input"] == "Country : Spain"


def test_generate_stop_reads_a_backslash_n_as_a_newline(env, monkeypatch):
    """The README's `--stop "\\n"` reaches the program as a backslash and an n (what a shell passes): it was sent
    to the engine as those two characters, which generated text hardly ever holds, so nothing was cut."""
    from softprompt.engine import Engine

    sent, real = [], Engine.generate

    def recording(self, reqs, *args, **kwargs):
        sent.extend(r.stop for r in reqs)
        return real(self, reqs, *args, **kwargs)

    monkeypatch.setattr(Engine, "generate", recording)
    for given, stop in (("\\n", ["\n"]), ("a\\tb\\\\n", ["a\tb\\n"]), ("", [])):
        rc, _, stderr = run(["generate", "--model", env["model"], "--input", "good", "--raw", "--max-new-tokens",
                             "1", "--stop", given])
        assert rc == 0, stderr
        assert sent.pop() == stop, given


def test_generate_ends_a_classification_answer_at_its_label(env, trained, monkeypatch):
    """A classification prompt learns the label's tokens only: without --max-new-tokens `generate` ran on for 16
    tokens (the README's main command printed " positive positive positive ..."). Its budget is now the longest
    label plus one, the output ends after the label it starts with (the longest one), and the row names it;
    with --max-new-tokens the text is left whole."""
    from softprompt.engine import Engine
    from softprompt.engine.requests import GenerateResult

    outputs = iter([" positive positive", " negative.", " so-so"] * 2)
    asked = []

    def scripted(self, reqs, *args, **kwargs):
        asked.extend(r.max_tokens for r in reqs)
        return [GenerateResult(r.task, next(outputs), [], "length", 0, source=str(r.input)) for r in reqs]

    monkeypatch.setattr(Engine, "generate", scripted)
    prompt = trained[0] / "prompt"
    inputs = ["--input", "good movie", "--input", "bad film", "--input", "meh"]
    rc, rows, stderr = _generate(env, prompt, *inputs)
    assert rc == 0, stderr
    tok = make_tokenizer()
    longest = max(len(tok(t, add_special_tokens=False)["input_ids"]) for t in (" positive", " negative"))
    assert asked == [longest + 1] * 3
    assert [(r["output"], r["finish_reason"], r["label"]) for r in rows] == [
        (" positive", "stop", "positive"), (" negative", "stop", "negative"), (" so-so", "length", None)]
    rc, rows, stderr = _generate(env, prompt, *inputs, "--max-new-tokens", "7")
    assert rc == 0, stderr
    assert asked[3:] == [7] * 3
    assert [(r["output"], r["finish_reason"], r["label"]) for r in rows] == [
        (" positive positive", "length", "positive"), (" negative.", "length", "negative"), (" so-so", "length", None)]


def test_generate_row_names_the_longest_label_its_output_starts_with():
    from types import SimpleNamespace

    from softprompt.data.template import TaskFormat
    from softprompt.engine.requests import GenerateResult
    from softprompt.workflows.generation import output_row

    fmt = TaskFormat("Q: {text}\nA:", "label", verbalizer={"no": "not", "unsure": "not sure", "yes": "yes"})
    engine = SimpleNamespace(task=lambda name: SimpleNamespace(formats=[fmt]))
    rows = [output_row(engine, "t", GenerateResult("t", text, [], "length", 0)) for text in
            (" not sure at all", " not really", " maybe")]
    assert [(r["output"], r["label"], r["finish_reason"]) for r in rows] == [
        (" not sure", "unsure", "stop"), (" not", "no", "stop"), (" maybe", None, "length")]
    chat = output_row(engine, "t", GenerateResult("t", " not sure", [], "length", 0), chat=True)
    assert "label" not in chat and chat["output"] == " not sure"


def test_generate_fills_template_raw_and_seeded_sampling(env, trained):
    prompt = trained[0] / "prompt"
    rc, rows, stderr = _generate(env, prompt, "--input", "good movie", "--input", "bad film", "--max-new-tokens", "4")
    assert rc == 0, stderr
    assert [r["input"] for r in rows] == ["Review: good movie\nSentiment:", "Review: bad film\nSentiment:"]
    assert all(set(r) == {"task", "input", "output", "finish_reason", "label"} and isinstance(r["output"], str)
               for r in rows)
    assert all(r["finish_reason"] in ("stop", "length") and r["task"] == "prompt" for r in rows)
    rc, rows, _ = _generate(env, prompt, "--input", "good movie", "--raw", "--max-new-tokens", "4")
    assert rc == 0 and [r["input"] for r in rows] == ["good movie"]
    sampled = [_generate(env, prompt, "--input", "good movie", "--temperature", "1", "--seed", "3",
                           "--max-new-tokens", "6")[1]
               for _ in range(2)]
    assert sampled[0] == sampled[1]
    assert len(sampled[0]) == 1 and sampled[0][0]["output"]


def test_generate_checks_fingerprint(env, trained):
    prompt = trained[0] / "prompt"
    rc, stdout, stderr = run(["generate", "--model", env["other_model"], "--prompt", prompt, "--input", "good"])
    assert rc == 2 and stdout == ""
    assert "different base model" in stderr and "embedding_sha256" in stderr
    assert "--no-fingerprint-check" in stderr and "Traceback" not in stderr
    rc, stdout, stderr = run(["generate", "--model", env["other_model"], "--prompt", prompt, "--input", "good",
                              "--no-fingerprint-check", "--max-new-tokens", "2"])
    assert rc == 0, stderr
    assert json.loads(stdout)["input"] == "Review: good\nSentiment:"


def _assert_usage_error(argv, *needles: str) -> str:
    rc, stdout, stderr = run(argv)
    assert rc == 2, (stdout, stderr)
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in stderr, (needle, stderr)
    return stderr


def test_errors_name_the_flag_or_file(env, tmp_path):
    base = ["train", "--model", env["model"], "--train-file", env["train"], "--output-dir", tmp_path / "o"]
    _assert_usage_error([*base, "--optimizer", "sgd"], "--optimizer", "'sgd'")
    err = _assert_usage_error([*base, "--batch-size", "0", "--lr", "-1"], "--batch-size must be >= 1, got 0",
                              "--lr must be > 0")
    assert err.count("softprompt train: error") == 1  # both problems in one message
    missing = tmp_path / "missing.jsonl"
    _assert_usage_error(["train", "--model", env["model"], "--train-file", missing], "--train-file", str(missing))
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train:\n  max_stepz: 2\n")
    _assert_usage_error([*base, "--config", bad_yaml], str(bad_yaml), "train.max_stepz")
    _assert_usage_error(["eval", "--model", env["model"], "--prompt", tmp_path / "nope", "--test-file",
                         env["test"]], str(tmp_path / "nope"))
    assert not (tmp_path / "o").exists()  # argument errors stop before anything is written


def test_no_train_split_and_bad_jsonl_line(env, tmp_path):
    common = ["--model", env["model"], "--template", TEMPLATE, "--target-field", "label", "--init", "random",
              "--output-dir", tmp_path / "o"]
    _assert_usage_error(["train", "--test-file", env["test"], *common], "--train-file")
    lines = env["train"].read_text().splitlines(keepends=True)
    bad = tmp_path / "badline.jsonl"
    bad.write_text("".join(lines[:3]) + "{not json\n" + "".join(lines[3:]))
    _assert_usage_error(["train", "--train-file", bad, *common], "badline.jsonl", "line 4")


def _resume_args(env, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", env["model"], "--train-file", env["train"], "--validation-file", env["validation"],
            "--template", TEMPLATE, "--target-field", "label", "--num-virtual-tokens", "4", "--batch-size", "4",
            "--eval-every", "3", "--init", "random", "--max-steps", "6", "--checkpoint-every", "2",
            "--output-dir", out, *extra]


def _tensors(folder: Path) -> dict:
    return load_file(str(folder / "adapter_model.safetensors"))


def _assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].equal(b[k]), (what, k)


def test_resume(env, tmp_path, monkeypatch):
    import softprompt.train as train_mod

    # 1. an uninterrupted 6-step run
    full = tmp_path / "full"
    rc, _, stderr = run(_resume_args(env, full))
    assert rc == 0, stderr
    assert json.loads((full / "checkpoint" / "state.json").read_text())["step"] == 6
    last = _tensors(full / "last")
    best = (full / "best" / "adapter_model.safetensors").read_bytes()
    log = (full / "metrics.jsonl").read_text()
    assert [json.loads(line)["step"] for line in log.splitlines()] == [1, 2, 3, 4, 5, 6]

    # 2. --resume of a finished run has nothing to do and changes nothing
    rc, stdout, stderr = run(_resume_args(env, full, "--resume"))
    assert rc == 0, stderr
    assert "trained 6 steps" in stdout
    _assert_same_tensors(_tensors(full / "last"), last, "last after resume")
    assert (full / "best" / "adapter_model.safetensors").read_bytes() == best
    assert (full / "metrics.jsonl").read_text() == log

    # 3. a run killed right after its step-4 checkpoint, then resumed, ends where the uninterrupted run did
    real_save = train_mod.save_checkpoint

    def save_then_die(out, step, *args, **kwargs):
        real_save(out, step, *args, **kwargs)
        if step == 4:
            raise KeyboardInterrupt

    cut = tmp_path / "cut"
    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(_resume_args(env, cut))
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    assert json.loads((cut / "checkpoint" / "state.json").read_text())["step"] == 4
    assert not (cut / "last").exists()
    rc, _, stderr = run(_resume_args(env, cut, "--resume"))
    assert rc == 0, stderr
    for name in ("last", "best", "prompt"):
        _assert_same_tensors(_tensors(cut / name), _tensors(full / name), name)
    assert [json.loads(line)["step"] for line in (cut / "metrics.jsonl").read_text().splitlines()] == [
        1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("legacy_checkpoint", [False, True])
def test_prompt_is_the_best_validation_prompt(env, tmp_path, legacy_checkpoint):
    """prompt/ holds best/'s tensors and validation metrics; so does a resume of a checkpoint without the best
    state (written before checkpoints kept it), which takes them from best/."""
    out = tmp_path / "run"
    assert run(_resume_args(env, out))[0] == 0
    if legacy_checkpoint:
        (out / "checkpoint" / "best.safetensors").unlink()
        (out / "prompt" / "adapter_model.safetensors").unlink()
        rc, _, stderr = run(_resume_args(env, out, "--resume"))
        assert rc == 0, stderr
    _assert_same_tensors(_tensors(out / "prompt"), _tensors(out / "best"), "prompt")
    # validation peaked before the last step (step 3 of 6): best/ is not last/
    assert not _tensors(out / "best")["prompt_embeddings"].equal(_tensors(out / "last")["prompt_embeddings"])
    best_meta = json.loads((out / "best" / "softprompt.json").read_text())
    prompt_meta = json.loads((out / "prompt" / "softprompt.json").read_text())
    assert "val_loss" in best_meta["metrics"]
    # the step the kept prompt comes from is on disk: in prompt/ and best/, and as the last line of metrics.jsonl
    # marked best (a validation line; an earlier one that improved is marked too)
    assert prompt_meta["metrics"]["best_step"] == 3
    assert best_meta["metrics"] == {**prompt_meta["metrics"]["validation"], "best_step": 3}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    marked = [r["step"] for r in rows if r.get("best")]
    assert marked[-1] == 3 and all("val_loss" in r for r in rows if r.get("best"))


def test_a_fresh_run_in_a_used_folder_leaves_none_of_the_earlier_runs_outputs(env, tmp_path):
    """A run with validation and test splits wrote best/ and eval.json; a train-only run in the same folder writes
    neither, and kept them beside its own prompt/ (another run's best prompt and test numbers)."""
    out = tmp_path / "o"
    rc, _, stderr = run(train_argv(env, out, "--max-steps", "2"))
    assert rc == 0, stderr
    assert (out / "best").is_dir() and (out / "eval.json").is_file()
    first = _tensors(out / "prompt")
    rc, _, stderr = run(["train", "--model", env["model"], "--train-file", env["train"], "--template", TEMPLATE,
                         "--target-field", "label", "--num-virtual-tokens", "4", "--batch-size", "4", "--init",
                         "random", "--max-steps", "1", "--output-dir", out])
    assert rc == 0, stderr
    assert not (out / "best").exists() and not (out / "eval.json").exists()
    assert {p.name for p in out.iterdir()} == {"config.yaml", "metrics.jsonl", "checkpoint", "train_args.json",
                                               "last", "prompt", "curves.png"}
    assert not _tensors(out / "prompt")["prompt_embeddings"].equal(first["prompt_embeddings"])
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 1


def test_resume_on_another_model_or_validation_split_is_usage_error(env, tmp_path):
    """A resume continues the prompt, the best state and the validation curve of the checkpoint: another base model
    of the same shapes (here other weights) trained on in silence and saved the prompt as the new model's; another
    validation file mixed the best metric and the curve of two sets. A checkpoint that records neither (written
    before they were recorded) still resumes."""
    out = tmp_path / "o"
    args = ["train", "--train-file", env["train"], "--template", TEMPLATE, "--target-field", "label", "--init",
            "random", "--batch-size", "4", "--num-virtual-tokens", "4", "--output-dir", out]
    assert run([*args, "--model", env["model"], "--validation-file", env["validation"], "--max-steps", "1"])[0] == 0
    resume = [*args, "--max-steps", "2", "--resume"]
    _assert_usage_error([*resume, "--model", env["other_model"], "--validation-file", env["validation"]],
                        f"--model {str(env['model'])!r} there, {str(env['other_model'])!r} now",
                        "embedding_sha256")
    other_valid = write_jsonl(tmp_path / "valid2.jsonl", sentiment_records(8, seed=5))
    _assert_usage_error([*resume, "--model", env["model"], "--validation-file", other_valid],
                        "the validation examples (another --validation-file")
    _assert_usage_error([*resume, "--model", env["model"]], "the validation examples")  # none now
    # the same model from another folder is the same model
    shutil.copytree(env["model"], tmp_path / "copy")
    rc, _, stderr = run([*resume, "--model", tmp_path / "copy", "--validation-file", env["validation"]])
    assert rc == 0, stderr
    state = out / "checkpoint" / "state.json"
    recorded = json.loads(state.read_text())
    assert {"model_fingerprint", "validation_digest"} <= set(recorded["settings"])
    for key in ("model_fingerprint", "validation_digest"):
        del recorded["settings"][key]
    state.write_text(json.dumps(recorded))
    rc, _, stderr = run([*args, "--max-steps", "3", "--resume", "--model", env["other_model"], "--validation-file",
                         other_valid])
    assert rc == 0, stderr


def test_resume_with_incompatible_checkpoint_is_usage_error(env, tmp_path):
    args = ["train", "--model", env["model"], "--train-file", env["train"], "--validation-file", env["validation"],
            "--template", TEMPLATE, "--target-field", "label", "--init", "random", "--batch-size", "4",
            "--max-steps", "1", "--output-dir", tmp_path / "o"]  # validation: --metric acts on it (else refused)
    assert run([*args, "--num-virtual-tokens", "4"])[0] == 0
    ck, config = tmp_path / "o" / "checkpoint", (tmp_path / "o" / "config.yaml").read_text()
    _assert_usage_error([*args, "--num-virtual-tokens", "5", "--max-steps", "2", "--resume"], "--resume", str(ck))
    # the optimizer state and lr schedule come from the checkpoint: another optimizer (a TypeError at its first
    # step) or another lr (silently ignored) is refused, naming both values
    resume = [*args, "--num-virtual-tokens", "4", "--max-steps", "2", "--resume"]
    _assert_usage_error([*resume, "--optimizer", "adamw"], "--optimizer 'adafactor' there, 'adamw' now")
    _assert_usage_error([*resume, "--lr", "0.5", "--weight-decay", "0.1"], "--lr 0.3 there, 0.5 now",
                        "--weight-decay 1e-05 there, 0.1 now")
    # the rest of the epoch's order comes from the seed, the batch size and the length grouping, the lr curve
    # from the warmup and the schedule: others were accepted (repeating some examples, skipping others) and
    # config.yaml then recorded them as the whole run's
    _assert_usage_error([*resume, "--seed", "7", "--batch-size", "8", "--grad-accum", "2", "--no-group-by-length",
                         "--warmup-steps", "3", "--schedule", "cosine"], "--seed 0 there, 7 now",
                        "--batch-size 4 there, 8 now", "--grad-accum 1 there, 2 now",
                        "--group-by-length True there, False now", "--warmup-steps 10 there, 3 now",
                        "--schedule 'linear' there, 'cosine' now")
    # other training data (here its sample cap) shuffled by the same seed is another order, and the best state
    # so far was measured by one metric: both were accepted, the second comparing an accuracy with a loss
    _assert_usage_error([*resume, "--max-train-samples", "5", "--metric", "loss"],
                        "the training examples (another file, --data-seed, --max-length or sample cap)",
                        "--metric 'auto' there, 'loss' now")
    # a damaged file of the checkpoint is named, not a traceback
    shutil.copytree(ck, tmp_path / "saved")
    for name, data in (("state.json", b"{"), ("method.safetensors", b"\x00" * 10), ("optimizer.pt", b"junk")):
        (ck / name).write_bytes(data)
        _assert_usage_error(resume, f"--resume: {ck / name} cannot be read", "the checkpoint is damaged")
        shutil.copy(tmp_path / "saved" / name, ck / name)
    assert (tmp_path / "o" / "config.yaml").read_text() == config  # no refused resume rewrote the run's settings
    # a metrics line cut short by a kill is dropped with a warning, and the resume goes on
    with open(tmp_path / "o" / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "lo')
    rc, _, stderr = run(resume)
    assert rc == 0, stderr
    assert "dropped 1 unreadable line(s)" in stderr
    assert [json.loads(ln)["step"] for ln in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_subprocess_exit_code(env, tmp_path):
    missing = tmp_path / "missing.jsonl"
    pythonpath = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "softprompt", "train", "--model", str(env["model"]),
                           "--train-file", str(missing), "--batch-size", "0"], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": pythonpath}, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert f"--train-file {missing}: no such file" in proc.stderr and "--batch-size must be >= 1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_train_stores_into_an_empty_folder_and_refuses_an_unusable_store_before_training(env, tmp_path):
    """An empty --store folder becomes a store (it was refused after the whole run: 'not a prompt store'); a
    folder of other files, or a --task that is an ensemble, is exit 2 before any training."""
    store = tmp_path / "empty"
    store.mkdir()
    rc, stdout, stderr = run(train_argv(env, tmp_path / "a", "--max-steps", "1", "--baselines", "no_prompt",
                                        "--store", store, "--task", "t"))
    assert rc == 0 and f"added to store {store} as task 't'" in stdout, stderr
    assert run(["store", "add", "--store", store, "u", tmp_path / "a" / "prompt"])[0] == 0
    assert run(["ensemble", "--store", store, "--name", "e", "--members", "t,u", "--combine", "vote"])[0] == 0
    _assert_usage_error(train_argv(env, tmp_path / "b", "--store", store, "--task", "e"),
                        "entry 'e' is an ensemble, the run would store a prompt there")
    # t is a member of e: a prompt of other labels or of another base model would break it once trained
    argv = train_argv(env, tmp_path / "d", "--store", store, "--task", "t")
    argv[argv.index("positive=positive,negative=negative")] = "positive=positive,negative=negative,neutral=neutral"
    _assert_usage_error(argv, "replacing 't' would break ensemble 'e'")
    argv = train_argv(env, tmp_path / "e", "--store", store, "--task", "t")
    argv[argv.index("--model") + 1] = env["other_model"]
    _assert_usage_error(argv, "replacing 't' would break ensemble 'e'")
    assert not any((tmp_path / d / "metrics.jsonl").exists() for d in "de")  # refused before training
    (store / "notes").mkdir()
    (store / "notes" / "todo.txt").write_text("mine")
    _assert_usage_error(train_argv(env, tmp_path / "b", "--store", store, "--task", "notes"),
                        "is a folder that is not a stored prompt")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    _assert_usage_error(train_argv(env, tmp_path / "c", "--store", other, "--task", "t"),
                        "a non-empty folder without")
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_store_ensemble_generate_and_eval_through_the_engine(env, tmp_path):
    store = tmp_path / "store"
    for name, seed in (("sent_a", "1"), ("sent_b", "2")):
        rc, stdout, stderr = run(train_argv(env, tmp_path / name, "--max-steps", "2", "--seed", seed,
                                            "--baselines", "no_prompt", "--store", store, "--task", name))
        assert rc == 0, stderr
        assert f"added to store {store} as task '{name}'" in stdout
    rc, stdout, stderr = run(["ensemble", "--store", store, "--name", "sent_ens", "--members", "sent_a,sent_b",
                              "--combine", "vote"])
    assert rc == 0, stderr
    rc, stdout, _ = run(["store", "list", "--store", store, "--json"])
    listed = {e["name"]: e for e in json.loads(stdout)}
    assert set(listed) == {"sent_a", "sent_b", "sent_ens"} and listed["sent_ens"]["kind"] == "ensemble"
    rc, rows, stderr = _generate_store(env, store, "sent_b", "--input", "good movie", "--max-new-tokens", "3")
    assert rc == 0, stderr
    assert rows[0]["task"] == "sent_b" and rows[0]["input"] == "Review: good movie\nSentiment:"
    # the same prompt from its run folder gives the same greedy text
    _, direct, _ = _generate(env, tmp_path / "sent_b" / "prompt", "--input", "good movie", "--max-new-tokens", "3")
    assert direct[0]["output"] == rows[0]["output"]
    rc, _, stderr = _generate_store(env, store, "sent_ens", "--input", "good")
    assert rc == 2 and "ensembles classify and score" in stderr
    report = tmp_path / "report.json"
    rc, stdout, stderr = run(["eval", "--model", env["model"], "--store", store, "--report", report])
    assert rc == 0, stderr
    metrics = json.loads(report.read_text())
    assert set(metrics) == {"sent_a", "sent_b", "sent_ens"} and all(m["n"] == 8 for m in metrics.values())
    # a task's store evaluation equals the run's own test report for the tuned prompt
    own = json.loads((tmp_path / "sent_a" / "eval.json").read_text())["tuned soft prompt"]
    assert metrics["sent_a"]["accuracy"] == own["accuracy"]
    assert metrics["sent_a"]["loss"] == pytest.approx(own["loss"], rel=1e-5)


def test_store_evaluation_checks_every_entry_first_and_ensembles_need_labels(env, tmp_path):
    store = tmp_path / "store"
    for name, seed in (("gen_a", "1"), ("gen_b", "2")):  # no verbalizer: the label word is a free-text target
        argv = [a for a in train_argv(env, tmp_path / name, "--max-steps", "2", "--seed", seed, "--baselines",
                                      "no_prompt", "--store", store, "--task", name)
                if a != "--verbalizer" and a != "positive=positive,negative=negative"]
        rc, _, stderr = run(argv)
        assert rc == 0, stderr
    # an ensemble of generation prompts was stored, then refused by every command that loads it
    _assert_usage_error(["ensemble", "--store", store, "--name", "gen_ens", "--members", "gen_a,gen_b"],
                        "member 'gen_a' has no labels", "member 'gen_b' has no labels")
    assert sorted(PromptStore(store).names()) == ["gen_a", "gen_b"]
    report = tmp_path / "report.json"
    rc, _, stderr = run(["eval", "--model", env["model"], "--store", store, "--report", report])
    assert rc == 0, stderr
    assert "evaluated gen_a in" in stderr  # the log line the refusal below must not reach
    metrics = json.loads(report.read_text())
    assert set(metrics) == {"gen_a", "gen_b"} and all(m["n"] == 8 for m in metrics.values())
    own = json.loads((tmp_path / "gen_a" / "eval.json").read_text())["tuned soft prompt"]
    assert metrics["gen_a"]["exact_match"] == own["exact_match"]
    assert metrics["gen_a"]["loss"] == pytest.approx(own["loss"], rel=1e-5)
    # baselines are not evaluated for a store's entries: asking for them is refused, not ignored
    for extra, needle in ((["--baselines", "k_shot"], "--baselines k_shot: eval --store scores each entry alone"),
                          (["--k-shot", "2"], "--k-shot 2: eval --store scores each entry alone")):
        _assert_usage_error(["eval", "--model", env["model"], "--store", store, *extra], needle)
    # an unknown entry fails the command before any entry is evaluated, naming it
    stderr = _assert_usage_error(["eval", "--model", env["model"], "--store", store, "--task", "gen_a,nope,gen_b"],
                                 "cannot evaluate nope:")
    assert "evaluated gen_a" not in stderr


def test_store_evaluation_reads_every_split_and_checks_every_entry_before_the_first(env, tmp_path, monkeypatch):
    """eval --store read an entry's --split only at its turn, and an entry stored without a task record (a PEFT
    folder added with `store add`) was scored on the default dataset: a missing split, or an entry that cannot
    score its task, failed after the other entries' evaluations (or was scored on data it never saw)."""
    import softprompt.workflows.evaluation as evaluation
    from softprompt.methods import build_method
    from softprompt.store import save_prompt

    store = tmp_path / "store"
    rc, _, stderr = run(train_argv(env, tmp_path / "good", "--max-steps", "1", "--baselines", "no_prompt",
                                   "--store", store, "--task", "good"))
    assert rc == 0, stderr
    argv = train_argv(env, tmp_path / "noval", "--max-steps", "1", "--baselines", "no_prompt", "--store", store,
                      "--task", "noval")
    for flag_, value in (("--validation-file", env["validation"]), ("--eval-every", "2")):  # no validation split
        i = argv.index(flag_)
        assert argv[i + 1] == value
        del argv[i:i + 2]
    rc, _, stderr = run(argv)
    assert rc == 0, stderr
    model = make_model("llama")
    bare = save_prompt(tmp_path / "bare", build_method("prompt_tuning", {"num_virtual_tokens": 2, "init": "random"},
                                                       model, make_tokenizer()), model)  # no task record
    assert run(["store", "add", "--store", store, "bare", bare])[0] == 0

    def never(*args, **kwargs):
        raise AssertionError("an entry was evaluated before every entry was checked")

    monkeypatch.setattr(evaluation, "evaluate_on_engine", never)
    common = ["eval", "--model", env["model"], "--store", store]
    _assert_usage_error([*common, "--split", "validation", "--task", "good,noval"],
                        "cannot evaluate noval: no 'validation' split (have: train, test); pass --validation-file")
    _assert_usage_error([*common, "--task", "good,bare"], "cannot evaluate bare: it records no task data",
                        "no data flag names any", "--task bare")
    data = ["--test-file", env["test"], "--template", TEMPLATE, "--target-field", "label"]
    _assert_usage_error([*common, *data, "--verbalizer", "positive=positive,negative=negative", "--task", "good,bare"],
                        "bare: its task is a classification task (labels positive, negative) and the entry has no "
                        "labels")
    _assert_usage_error([*common, *data, "--verbalizer", "positive=good,negative=bad,neutral=plot", "--task", "good"],
                        "good: its task is a classification task (labels positive, negative, neutral) and the entry "
                        "has labels positive, negative")
    monkeypatch.undo()
    report = tmp_path / "r.json"
    rc, _, stderr = run([*common, *data, "--task", "bare", "--max-new-tokens", "2", "--report", report])
    assert rc == 0, stderr  # given its data (free-text answers), the bare entry is scored
    assert json.loads(report.read_text())["bare"]["n"] == 8


def test_validation_during_training_decodes_max_new_tokens(env, tmp_path, monkeypatch):
    """Validation generated 16 tokens whatever --max-new-tokens said: longer answers were cut, and the best
    prompt was selected on truncated text."""
    import softprompt.evaluate as evaluate_mod

    asked, real = [], evaluate_mod.generate_texts

    def recording(model, tokenizer, prompt_kv, sources, max_new_tokens, *args, **kwargs):
        asked.append(max_new_tokens)
        return real(model, tokenizer, prompt_kv, sources, max_new_tokens, *args, **kwargs)

    monkeypatch.setattr(evaluate_mod, "generate_texts", recording)
    rc, _, stderr = run(["train", "--model", env["model"], "--dataset", "capitals", "--max-new-tokens", "5",
                         "--eval-every", "1", "--max-steps", "2", "--batch-size", "4", "--num-virtual-tokens", "2",
                         "--baselines", "no_prompt", "--max-validation-samples", "4", "--output-dir", tmp_path / "o"])
    assert rc == 0, stderr
    assert asked == [5, 5]  # the two validations (the final report runs through the engine)


def test_eval_of_a_prompt_without_task_data_is_refused_unless_a_data_flag_names_some(env, tmp_path, monkeypatch):
    """A PEFT-written folder records no task: eval --prompt scored it on the default dataset's test split with the
    default template, as if that were its task (eval --store refused the same entry). Now it is exit 2 before the
    model loads, naming the flags; with --test-file and the template it is evaluated."""
    from softprompt.methods import build_method
    from softprompt.store import save_prompt
    from softprompt.workflows import evaluation

    model = make_model("llama")
    bare = save_prompt(tmp_path / "bare", build_method("prompt_tuning", {"num_virtual_tokens": 2, "init": "random"},
                                                       model, make_tokenizer()), model)  # no task record

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(evaluation, "load_model_from_args", never)
    _assert_usage_error(["eval", "--model", env["model"], "--prompt", bare], f"prompt {bare} records no task data",
                        "no data flag names any", "--dataset NAME or --test-file FILE")
    monkeypatch.undo()
    rc, stdout, stderr = run(["eval", "--model", env["model"], "--prompt", bare, "--test-file", env["test"],
                              "--template", TEMPLATE, "--target-field", "label", "--verbalizer",
                              "positive=positive,negative=negative", "--baselines", "no_prompt"])
    assert rc == 0, stderr
    assert "test split (8 examples)" in stdout


def test_eval_of_a_prompt_trained_on_files_reads_its_files_and_cuts_where_training_did(env, tmp_path):
    """eval --prompt without data flags scored a prompt trained on files on the default dataset (rotten_tomatoes:
    same fields, plausible numbers), and cut inputs at the default --max-length instead of the run's."""
    out, report = tmp_path / "o", tmp_path / "r.json"
    rc, _, stderr = run(train_argv(env, out, "--max-steps", "1", "--baselines", "no_prompt", "--max-length", "8"))
    assert rc == 0, stderr
    own = json.loads((out / "eval.json").read_text())["tuned soft prompt"]
    evaluate = ["eval", "--model", env["model"], "--prompt", out / "prompt", "--baselines", "no_prompt", "--report",
                report]
    rc, _, stderr = run(evaluate)
    assert rc == 0, stderr
    got = json.loads(report.read_text())["tuned soft prompt"]
    assert got["n"] == own["n"] == 8 and got["loss"] == pytest.approx(own["loss"], rel=1e-5)
    assert f"--max-length 8, --train-file {env['train']}" in stderr  # said, not silent
    rc, _, stderr = run([*evaluate, "--max-length", "64"])  # a given flag wins: the inputs are no longer cut
    assert rc == 0, stderr
    assert json.loads(report.read_text())["tuned soft prompt"]["loss"] != pytest.approx(own["loss"], rel=1e-5)


def test_eval_refuses_a_verbalizer_whose_label_can_never_win_and_names_an_over_long_target(env, trained,
                                                                                          tmp_path):
    """Training refuses a verbalizer whose label could never be predicted (" positive ." scores below " positive"
    always); eval --prompt scored it, the label never chosen. A test target over --max-length stopped eval
    mid-evaluation as "request 9: score input for task 'condition0'", no file or line: the split is encoded first."""
    out, _ = trained
    rc, stdout, stderr = run(["eval", "--model", env["model"], "--prompt", out / "prompt", "--baselines", "no_prompt",
                              "--verbalizer", "positive=positive,negative=positive ."])
    assert rc == 2 and not stdout, stderr
    assert "labels 'positive' and 'negative'" in stderr and "can never be predicted" in stderr
    assert "condition0" not in stderr  # the engine's name for an evaluated condition means nothing to a user
    gen = tmp_path / "gen"
    rc, _, stderr = run(["train", "--model", env["model"], "--train-file", env["train"], "--test-file", env["test"],
                         "--template", TEMPLATE, "--target-field", "label", "--num-virtual-tokens", "2",
                         "--max-steps", "1", "--batch-size", "4", "--max-length", "16", "--baselines", "no_prompt",
                         "--max-new-tokens", "2", "--output-dir", gen])
    assert rc == 0, stderr
    records = sentiment_records(4, seed=3)
    records[2]["label"] = " ".join(["good"] * 20)  # 20 tokens + the EOS: past the run's --max-length 16
    test = write_jsonl(tmp_path / "long.jsonl", records)
    rc, stdout, stderr = run(["eval", "--model", env["model"], "--prompt", gen / "prompt", "--test-file", test,
                              "--baselines", "no_prompt", "--max-new-tokens", "2"])
    assert rc == 2 and not stdout, stderr
    assert "error: test split: long.jsonl line 3: target ' good good" in stderr
    assert "more than --max-length 16" in stderr


@pytest.mark.parametrize("init", [["--init", "random"], ["--method", "p_tuning"], []])
def test_eval_reports_the_hard_prompt_row_of_the_runs_init_text_as_train_did(env, tmp_path, init):
    """train's report has the init text (given or the task's default) as a hard prompt whatever --init; eval
    --prompt had that row only for a text init: the same prompt got other rows (none for --init random or
    P-tuning). Both now score the run's init text."""
    out, report = tmp_path / "o", tmp_path / "r.json"
    rc, stdout, stderr = run(train_argv(env, out, "--max-steps", "1", "--baselines", "hard_prompt", *init))
    assert rc == 0, stderr
    own = json.loads((out / "eval.json").read_text())
    assert list(own) == ["init text as hard prompt", "tuned soft prompt"]
    rc, _, stderr = run(["eval", "--model", env["model"], "--prompt", out / "prompt", "--baselines", "hard_prompt",
                         "--report", report])
    assert rc == 0, stderr
    got = json.loads(report.read_text())
    assert list(got) == list(own)
    assert got["init text as hard prompt"]["loss"] == pytest.approx(own["init text as hard prompt"]["loss"], rel=1e-6)


def test_eval_draws_k_shot_examples_from_the_training_examples_the_prompt_saw(env, tmp_path):
    """eval read the whole --train-file of a prompt trained with --max-train-samples: the k-shot baseline drew
    its shots from records the run never had, and its numbers differed from the run's own report."""
    out, report = tmp_path / "o", tmp_path / "r.json"
    rc, _, stderr = run(train_argv(env, out, "--max-steps", "1", "--baselines", "k_shot", "--k-shot", "2",
                                   "--max-train-samples", "6"))
    assert rc == 0, stderr
    own = json.loads((out / "eval.json").read_text())["2-shot prompting"]
    evaluate = ["eval", "--model", env["model"], "--prompt", out / "prompt", "--baselines", "k_shot", "--k-shot", "2",
                "--report", report]
    rc, _, stderr = run(evaluate)
    assert rc == 0, stderr
    assert json.loads(report.read_text())["2-shot prompting"]["loss"] == pytest.approx(own["loss"], rel=1e-6)
    assert "--max-train-samples 6" in stderr  # said, not silent
    rc, _, stderr = run([*evaluate, "--max-train-samples", "0"])  # a given flag wins: the whole file
    assert rc == 0, stderr
    assert json.loads(report.read_text())["2-shot prompting"]["loss"] != pytest.approx(own["loss"], rel=1e-6)


def test_eval_scores_the_test_subset_the_training_run_reported_on_unless_told_otherwise(env, tmp_path):
    """A prompt trained with --max-test-samples 4 was evaluated on the whole test split by eval: its numbers were
    not the run's own report's."""
    out, report = tmp_path / "o", tmp_path / "r.json"
    rc, stdout, stderr = run(train_argv(env, out, "--max-steps", "1", "--baselines", "no_prompt",
                                        "--max-test-samples", "4"))
    assert rc == 0, stderr
    own = json.loads((out / "eval.json").read_text())["tuned soft prompt"]
    evaluate = ["eval", "--model", env["model"], "--prompt", out / "prompt", "--baselines", "no_prompt",
                "--report", report]
    rc, stdout, stderr = run(evaluate)
    assert rc == 0, stderr
    assert "test split (4 examples)" in stdout and "--max-test-samples 4" in stderr  # said, not silent
    got = json.loads(report.read_text())["tuned soft prompt"]
    assert got["n"] == own["n"] == 4 and got["loss"] == pytest.approx(own["loss"], rel=1e-6)
    rc, stdout, stderr = run([*evaluate, "--max-test-samples", "0"])  # a given flag wins: the whole split
    assert rc == 0, stderr
    assert "test split (8 examples)" in stdout


def test_eval_on_a_test_file_alone_says_the_k_shot_row_is_skipped_and_refuses_it_when_asked(env, tmp_path):
    """eval --prompt DIR --test-file F has no train split: the k-shot row was left out of the report in silence,
    also when --baselines k_shot asked for it."""
    out, report = tmp_path / "o", tmp_path / "r.json"
    rc, _, stderr = run(train_argv(env, out, "--max-steps", "1", "--baselines", "no_prompt"))
    assert rc == 0, stderr
    evaluate = ["eval", "--model", env["model"], "--prompt", out / "prompt", "--test-file", env["test"],
                "--report", report]
    rc, _, stderr = run(evaluate)  # the default baselines: the others run, the k-shot row is said to be skipped
    assert rc == 0, stderr
    assert "the k-shot baseline draws its shots from the train split, and the data evaluated has none" in stderr
    assert list(json.loads(report.read_text())) == ["no soft prompt (template only)", "init text as hard prompt",
                                                    "tuned soft prompt"]
    report.unlink()
    for asked in (["--baselines", "no_prompt,k_shot"], ["--k-shot", "2"]):
        _assert_usage_error([*evaluate, *asked], "--baselines k_shot (or --k-shot): the k-shot baseline draws its "
                            "--k-shot examples from the train split, and the data evaluated has none (splits: test)",
                            "give --train-file FILE")
        assert not report.exists()
    rc, _, stderr = run([*evaluate, "--baselines", "k_shot", "--k-shot", "2", "--train-file", env["train"]])
    assert rc == 0, stderr
    assert list(json.loads(report.read_text())) == ["2-shot prompting", "tuned soft prompt"]


def test_eval_uses_the_data_seed_the_prompt_was_trained_with(env, tmp_path):
    """A built-in dataset's splits depend on --data-seed: eval with the default seed scored a prompt trained
    with another one on examples that were mostly its training examples."""
    out, report = tmp_path / "caps", tmp_path / "r.json"
    common, baselines = ["--model", env["model"], "--max-new-tokens", "2"], ["--baselines", "no_prompt"]
    rc, _, stderr = run(["train", *common, *baselines, "--dataset", "capitals", "--data-seed", "7", "--max-steps", "1",
                         "--batch-size", "4", "--num-virtual-tokens", "2", "--output-dir", out])
    assert rc == 0, stderr
    own = json.loads((out / "eval.json").read_text())
    for store in (False, True):  # eval --prompt, and eval --store of the same prompt
        if store:
            assert run(["store", "add", "--store", tmp_path / "s", "caps", out / "prompt"])[0] == 0
        where = ["--store", tmp_path / "s"] if store else ["--prompt", out / "prompt", *baselines]
        rc, _, stderr = run(["eval", *common, *where, "--report", report])
        assert rc == 0, stderr
        got = json.loads(report.read_text())
        got = got["caps"] if store else got["tuned soft prompt"]
        assert got["loss"] == pytest.approx(own["tuned soft prompt"]["loss"], rel=1e-5), store
    # a given --data-seed still wins: the default seed's test split is another one
    rc, _, stderr = run(["eval", *common, *baselines, "--prompt", out / "prompt", "--data-seed", "13", "--report",
                         report])
    assert rc == 0, stderr
    assert json.loads(report.read_text())["tuned soft prompt"]["loss"] != pytest.approx(
        own["tuned soft prompt"]["loss"], rel=1e-5)


def _generate_store(env, store, task, *extra):
    rc, stdout, stderr = run(["generate", "--model", env["model"], "--store", store, "--task", task, *extra])
    return rc, [json.loads(line) for line in stdout.splitlines() if line.strip()], stderr


def test_store_and_task_flags_go_together(env, tmp_path):
    _assert_usage_error(train_argv(env, tmp_path / "x", "--store", tmp_path / "s"), "--store and --task")
    _assert_usage_error(train_argv(env, tmp_path / "x", "--store", tmp_path / "s", "--task", "../up"),
                        "invalid task name")
    _assert_usage_error(["generate", "--model", env["model"], "--task", "a", "--input", "x"], "--task needs --store")
    _assert_usage_error(["eval", "--model", env["model"]], "either --prompt DIR or --store DIR")
    _assert_usage_error(["eval", "--model", env["model"], "--store", tmp_path / "s", "--task", " , "],
                        "--task ' , ' names no task")
    _assert_usage_error(["eval", "--model", env["model"], "--prompt", tmp_path, "--task", "a"],
                        "--task names tasks of a store")


@pytest.mark.parametrize("extra", [["--method", "prefix_tuning", "--init-text", INIT_TEXT],
                                   ["--method", "p_tuning", "--encoder", "lstm", "--encoder-hidden-size", "16"],
                                   ["--method", "deep_prompt", "--init", "random", "--init-scale", "0.1"]])
def test_train_other_methods_then_generate(env, tmp_path, extra):
    out = tmp_path / "run"
    rc, stdout, stderr = run(train_argv(env, out, "--max-steps", "2", "--baselines", "no_prompt", *extra))
    assert rc == 0, stderr
    meta = json.loads((out / "prompt" / "softprompt.json").read_text())
    assert meta["method"] == extra[1] and "tuned soft prompt" in stdout
    rc, rows, stderr = _generate(env, out / "prompt", "--input", "good movie", "--max-new-tokens", "2")
    assert rc == 0, stderr


def test_method_specific_flag_errors_name_the_method(env, tmp_path):
    _assert_usage_error(train_argv(env, tmp_path / "x", "--method", "prefix_tuning", "--init", "sample_vocab"),
                        "--method prefix_tuning", "init must be one of")
    _assert_usage_error(train_argv(env, tmp_path / "x", "--method", "p_tuning", "--encoder", "gru"),
                        "--method p_tuning", "encoder must be one of")


def test_tune_command_searches_on_validation_and_saves_the_best_prompt_into_a_store(env, tmp_path):
    """``softprompt tune`` end to end: flags, the search, trials files, best prompt and the store entry."""
    out, store = tmp_path / "tune", tmp_path / "store"
    argv = train_argv(env, out, "--lrs", "1e-6,0.3,0.1", "--budget-steps", "12", "--eta", "3",
                      "--store", store, "--task", "sentiment")
    argv[0] = "tune"
    rc, stdout, stderr = run(argv)
    assert rc == 0, stderr
    trials = json.loads((out / "trials.json").read_text())
    assert len(trials["trials"]) == 3
    assert (out / "trials.md").is_file() and (out / "trials.png").is_file()
    assert 0 < sum(t["steps"] for t in trials["trials"]) == trials["steps_used"] <= 12
    best_config = next(t["config"] for t in trials["trials"] if t["id"] == trials["best"])
    assert best_config["lr"] != 1e-6  # a learning rate that cannot move the prompt never wins
    best = load_prompt(out / "best_prompt")
    assert best.meta["task"]["verbalizer"]
    assert PromptStore(store).names() == ["sentiment"]
    assert re.search(r"best: t\d+ .* at step \d+ of \d+; saved to", stdout), stdout


def test_eval_of_a_prompt_tuned_with_validation_from_train_rebuilds_its_held_out_split(env, tmp_path):
    """eval read the recorded --train-file whole: --split validation found no validation split, and --split
    train included the records the search held out as validation."""
    train = tmp_path / "train.jsonl"
    shutil.copy(env["train"], train)  # 32 records: 8 held out, 24 trained on
    out, store, report = tmp_path / "tune", tmp_path / "store", tmp_path / "r.json"
    rc, _, stderr = run(["tune", "--model", env["model"], "--train-file", train, "--test-file", env["test"],
                         "--template", TEMPLATE, "--target-field", "label", "--verbalizer",
                         "positive=positive,negative=negative", "--num-virtual-tokens", "2", "--batch-size", "4",
                         "--lrs", "0.01,0.3", "--min-steps", "1", "--max-steps", "2", "--validation-from-train",
                         "0.25", "--output-dir", out, "--store", store, "--task", "t"])
    assert rc == 0, stderr
    trials = json.loads((out / "trials.json").read_text())
    best = next(t for t in trials["trials"] if t["id"] == trials["best"])["rungs"][-1]["metrics"]
    common = ["--model", env["model"], "--report", report]
    for split, n in (("validation", 8), ("train", 24)):
        rc, _, stderr = run(["eval", *common, "--prompt", out / "best_prompt", "--baselines", "no_prompt", "--split",
                             split])
        assert rc == 0, stderr
        got = json.loads(report.read_text())["tuned soft prompt"]
        assert got["n"] == n
        if split == "validation":  # the very examples the search scored the prompt on
            assert got["loss"] == pytest.approx(best["loss"], rel=1e-5)
            assert "held out 8 of the 32 training examples" in stderr  # said, not silent
    rc, _, stderr = run(["eval", *common, "--store", store, "--split", "validation"])
    assert rc == 0, stderr
    assert json.loads(report.read_text())["t"]["loss"] == pytest.approx(best["loss"], rel=1e-5)
    with train.open("a") as f:  # the file changed since: the held-out records cannot be told apart
        f.write(train.read_text().splitlines()[0] + "\n")
    for where in (["--prompt", out / "best_prompt"], ["--store", store]):
        _assert_usage_error(["eval", *common, *where, "--split", "validation"],
                            "held out 8 of the 32 training examples", "it now gives 33 training examples",
                            "neither split can be rebuilt")


def test_tune_flags_are_checked_with_the_train_flags_at_once(env, tmp_path):
    argv = train_argv(env, tmp_path / "t", "--lrs", "0.3,-1", "--eta", "1", "--lr", "nan")
    argv[0] = "tune"
    rc, _, stderr = run(argv)
    assert rc == 2
    assert "--lrs" in stderr and "--eta" in stderr and "--lr" in stderr


def test_a_test_split_training_could_not_encode_is_refused_before_training(env, tmp_path):
    # a test answer over --max-length (validation's were refused up front) stopped the run after training,
    # before its report and its prompt/ were written
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "good movie", "label": " ".join(["positive"] * 12)}])
    argv = [a for a in train_argv(env, tmp_path / "run", "--max-steps", "2", "--max-length", "10",
                                  "--test-file", str(test))
            if a not in ("--verbalizer", "positive=positive,negative=negative")]
    rc, _, stderr = run(argv)
    assert rc == 2 and "test split: test.jsonl line 1: target" in stderr and "more than --max-length 10" in stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_validation_split_one_label_dominates_selects_by_macro_f1_in_train_and_tune_and_says_so(env, tmp_path):
    """7 of 8 validation answers are one label: accuracy would keep a prompt that answers it to everything, so
    --metric auto selects by macro-F1 there (it only warned); --metric accuracy still selects by accuracy."""
    valid = write_jsonl(tmp_path / "valid.jsonl", [{"text": "good movie", "label": "positive"}] * 7
                        + [{"text": "bad movie", "label": "negative"}])
    for command, extra in (("train", ()), ("tune", ("--lrs", "0.1,0.3"))):
        argv = train_argv(env, tmp_path / command, "--max-steps", "2", *extra)
        argv[0], argv[argv.index("--validation-file") + 1] = command, valid
        rc, stdout, stderr = run(argv)
        assert rc == 0, stderr
        assert "label 'positive' is 88% of the 8 examples" in stderr and "selected by macro-F1" in stderr, command
        chosen = "best validation {} " if command == "train" else "validation {} "
        assert chosen.format("macro_f1") in stdout, command
        rc, stdout, stderr = run(argv + ["--metric", "accuracy"])  # asked for: kept, no note
        assert rc == 0 and "selected by macro-F1" not in stderr and chosen.format("accuracy") in stdout, command


def test_answers_the_greedy_answer_cannot_match_are_warned_about(tokenizer, caplog):
    # a multi-line answer (generation stops at the first newline) or one over --max-new-tokens scored 0 exact
    # match whatever the prompt, with no word said
    import logging

    from softprompt.data import Example
    from softprompt.workflows.baselines import warn_answer_limits

    examples = [Example("a", " good"), Example("b", " very good movie\nthe plot"), Example("c", " good movie")]
    with caplog.at_level(logging.WARNING, logger="softprompt"):
        warn_answer_limits(tokenizer, examples, max_new_tokens=2, newline_stops=True)
    text = caplog.text
    assert "1 of the 3 reference answers are longer than --max-new-tokens 2 (the longest: 5 tokens)" in text
    assert "1 of the 3 reference answers span lines" in text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="softprompt"):
        warn_answer_limits(tokenizer, examples, max_new_tokens=5, newline_stops=False)  # a chat task
    assert caplog.text == ""

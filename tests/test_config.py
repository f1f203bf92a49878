"""Typed args, YAML config files and their error messages."""

from __future__ import annotations

import pytest

from softprompt.config import ConfigError, DataArgs, EvalArgs, PromptArgs, TrainArgs, build_args, load_yaml, to_yaml


def test_train_args_report_all_problems_with_flags():
    with pytest.raises(ConfigError) as err:
        TrainArgs(batch_size=0, lr=-1, optimizer="sgd", schedule="step", metric="bleu")
    msg = str(err.value)
    for part in ("--batch-size must be >= 1", "--lr must be > 0", "--optimizer must be adafactor or adamw",
                 "--schedule", "--metric"):
        assert part in msg


def test_data_args_check_files(tmp_path):
    with pytest.raises(ConfigError, match=r"--train-file .*nope.jsonl: no such file"):
        DataArgs(train_file=str(tmp_path / "nope.jsonl"))


def test_prompt_and_eval_args():
    with pytest.raises(ConfigError, match="--method must be one of"):
        PromptArgs(method="nope")
    with pytest.raises(ConfigError, match=r"--baselines: unknown \['zero'\]"):
        EvalArgs(baselines=["zero"])


def test_yaml_round_trip_and_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(to_yaml({"train": TrainArgs(lr=0.1, batch_size=4)}))
    cfg = load_yaml(path)
    assert cfg["train"]["lr"] == 0.1
    args = build_args(TrainArgs, cfg["train"], {"batch_size": 8, "lr": None})
    assert args.batch_size == 8 and args.lr == 0.1  # flags win, unset flags keep the YAML value


def test_yaml_errors_name_file_and_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.1\n  learning_rate: 3\nmodle:\n  model: x\n")
    with pytest.raises(ConfigError) as err:
        load_yaml(path)
    msg = str(err.value)
    assert f"{path}: train.learning_rate is not a known field" in msg
    assert f"{path}: unknown section 'modle'" in msg
    path.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(path)


def test_build_args_type_checks_and_converts():
    assert build_args(TrainArgs, {"lr": 1}).lr == 1.0
    assert build_args(EvalArgs, {"baselines": "no_prompt,k_shot"}).baselines == ["no_prompt", "k_shot"]
    with pytest.raises(ConfigError, match=r"--batch-size: expected int, got 'big'"):
        build_args(TrainArgs, {"batch_size": "big"})
    with pytest.raises(ConfigError, match=r"--resume: expected bool"):
        build_args(TrainArgs, {"resume": 1})


def test_yaml_exponent_floats_are_accepted(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 3e-1\n")  # PyYAML reads this as the string '3e-1'
    assert build_args(TrainArgs, load_yaml(path)["train"]).lr == 0.3
    with pytest.raises(ConfigError, match=r"--lr: expected float, got 'fast'"):
        build_args(TrainArgs, {"lr": "fast"})


def test_serve_tasks_need_a_store():
    from softprompt.config import ServeArgs

    with pytest.raises(ConfigError, match="--tasks names tasks of a store"):
        ServeArgs(tasks=["a"])
    assert ServeArgs(store="s", tasks=["a"]).tasks == ["a"]

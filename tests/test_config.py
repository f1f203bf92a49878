"""Typed args, YAML config files and their error messages."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest

from softprompt.config import (
    SECTIONS,
    ConfigError,
    DataArgs,
    EvalArgs,
    PromptArgs,
    ServeArgs,
    TrainArgs,
    build_args,
    check_folder_to_create,
    field_type,
    fit_max_length,
    flag,
    generate_flag_problems,
    load_yaml,
    to_yaml,
)
from softprompt.model import context_length


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


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "prefix_tuning", "deep_prompt"])
def test_prompt_args_default_to_the_methods_own_config(method):
    from softprompt.methods import get_method

    defaults = get_method(method).config_class.defaults()
    cfg = PromptArgs(method=method).method_config(seed=0)
    assert cfg == {k: v for k, v in defaults.items() if k in cfg}  # the CLI trains as the Python API does
    assert set(defaults) - set(cfg) <= {"init_text", "encoder_num_layers", "num_layers", "kv_heads", "head_dim"}
    assert PromptArgs(method=method).init_scale == defaults["init_scale"]
    assert build_args(PromptArgs, {"method": method}, {"init_scale": 0.25}).init_scale == 0.25  # given: kept


def test_prompt_args_resolved_defaults_per_method():
    assert PromptArgs().init_scale == 0.5 and PromptArgs().init == "text"  # prompt tuning: unchanged
    p = PromptArgs(method="p_tuning")
    assert (p.init_scale, p.encoder, p.init, p.vocab_sample_size) == (0.02, "mlp", None, None)  # None: not taken
    assert PromptArgs(method="prefix_tuning").init_scale == 0.02 and PromptArgs().init_text is None


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
    path.write_bytes(b"train:\n  lr: 0.1 # caf\xe9\n")  # Latin-1, not UTF-8
    with pytest.raises(ConfigError, match=re.escape(f"--config {path}: cannot read it as UTF-8 text")):
        load_yaml(path)
    path.write_bytes("\ufefftrain:\n  lr: 0.2\n".encode())  # a byte order mark is not part of the YAML
    assert load_yaml(path) == {"train": {"lr": 0.2}}
    for text, why in (("train:\n  max_steps: " + "1" * 5000 + "\n", "Exceeds the limit (4300 digits)"),
                      ("[" * 100000, "nested too deeply")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=re.escape(f"--config {path}: unreadable YAML ({why}")):
            load_yaml(path)


def test_yaml_duplicate_keys_and_non_mapping_files_are_refused_and_null_keys_are_not_given(tmp_path):
    """YAML keeps the last of two equal keys silently (a second train: section dropped the first's lr); a file
    that is [] or 0 read as an empty config; a key left empty (null) keeps the default but counted as given
    (eval then skipped the training run's recorded --data-seed)."""
    import argparse

    from softprompt.config import given

    path = tmp_path / "c.yaml"
    for text, line in (("train:\n  lr: 0.1\ntrain:\n  epochs: 3\n", 3), ("train:\n  lr: 0.1\n  lr: 0.2\n", 3)):
        path.write_text(text)
        with pytest.raises(ConfigError, match=rf"--config {re.escape(str(path))}: key '(train|lr)' appears twice in "
                                              rf"one mapping \(line {line}\)"):
            load_yaml(path)
    for text in ("[]\n", "0\n"):
        path.write_text(text)
        with pytest.raises(ConfigError, match="top level must be a mapping of sections"):
            load_yaml(path)
    path.write_text("")
    assert load_yaml(path) == {}
    # a merge key is no duplicate: PyYAML merges it, and a key after it overrides the merged value
    path.write_text("train:\n  <<: {lr: 0.1, epochs: 2}\n  lr: 0.2\n")
    assert load_yaml(path) == {"train": {"lr": 0.2, "epochs": 2}}
    path.write_text("data:\n  data_seed:\n  max_length: 64\n")
    ns = argparse.Namespace(config=str(path), data_seed=None, max_length=None)
    assert not given(ns, "data", "data_seed") and given(ns, "data", "max_length")


def test_build_args_type_checks_and_converts():
    assert build_args(TrainArgs, {"lr": 1}).lr == 1.0
    assert build_args(EvalArgs, {"baselines": "no_prompt, k_shot"}).baselines == ["no_prompt", "k_shot"]
    # a list flag that names nothing is refused (serve --tasks "," served every task of the store), and a
    # YAML list holds strings (serve.tasks: [[a]] was an unhashable-type traceback after the model loaded)
    with pytest.raises(ConfigError, match=r"--tasks: ' , ' names nothing"):
        build_args(ServeArgs, {"store": "s", "tasks": " , "})
    with pytest.raises(ConfigError, match=r"c\.yaml: serve\.tasks: expected a list of strings, got \[\['a'\]\]"):
        build_args(ServeArgs, {"store": "s", "tasks": [["a"]]}, origins=["c.yaml: serve."])
    with pytest.raises(ConfigError, match=r"--batch-size: expected int, got 'big'"):
        build_args(TrainArgs, {"batch_size": "big"})
    with pytest.raises(ConfigError, match=r"--resume: expected bool"):
        build_args(TrainArgs, {"resume": 1})


def test_a_section_built_in_python_is_type_checked_as_flags_are(tmp_path):
    """TrainArgs(batch_size=4.0) or max_steps="2" failed deep in training with a bare TypeError, and
    group_by_length="no" (truthy) silently grouped: each section's __post_init__ runs build_args' type check."""
    with pytest.raises(ConfigError) as err:
        TrainArgs(output_dir=str(tmp_path / "r"), batch_size=4.0, max_steps="2", eval_every=1.5, seed=1.5,
                  group_by_length="no", lr="fast", resume=None)
    assert str(err.value).split("\n  ")[1:] == [
        "--max-steps: expected int, got '2'", "--batch-size: expected int, got 4.0",
        "--group-by-length: expected bool, got 'no'", "--lr: expected float, got 'fast'",
        "--eval-every: expected int, got 1.5", "--resume: expected bool, got None", "--seed: expected int, got 1.5"]
    for cls, kw, msg in ((EvalArgs, {"baselines": [1]}, "--baselines: expected a list of strings, got [1]"),
                         (EvalArgs, {"k_shot": True}, "--k-shot: expected int, got True"),
                         (DataArgs, {"max_length": "64"}, "--max-length: expected int, got '64'"),
                         (PromptArgs, {"projection": "yes"}, "--projection: expected bool, got 'yes'"),
                         (ServeArgs, {"port": 80.0}, "--port: expected int, got 80.0")):
        with pytest.raises(ConfigError, match=re.escape(msg)):
            cls(**kw)
    # what the flags and config files convert is converted alike; a path is text; None stays where it means unset
    args = TrainArgs(output_dir=tmp_path / "r", lr=1, max_grad_norm="2.5")
    assert (args.output_dir, args.lr, args.max_grad_norm) == (str(tmp_path / "r"), 1.0, 2.5)
    assert type(args.lr) is float and EvalArgs(baselines=("k_shot",)).baselines == ["k_shot"]
    assert PromptArgs(num_virtual_tokens=None).num_virtual_tokens == 20
    assert build_args(TrainArgs, {"lr": "3e-1"}, {"batch_size": 4}).lr == 0.3


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


FLOAT_FIELDS = [(cls, f.name) for cls in SECTIONS.values() for f in dataclasses.fields(cls)
                if field_type(cls, f) is float]


def test_every_section_has_float_fields_to_check():
    names = {name for _, name in FLOAT_FIELDS}
    assert {"lr", "weight_decay", "max_grad_norm", "init_scale", "prompt_dropout", "max_wait_ms"} <= names


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize(("cls", "name"), FLOAT_FIELDS, ids=[n for _, n in FLOAT_FIELDS])
def test_float_fields_must_be_finite(cls, name, bad):
    with pytest.raises(ConfigError, match=rf"{flag(name)} must be a finite number, got {bad}"):
        cls(**{name: bad})


@pytest.mark.parametrize(("cls", "values", "needles"), [
    (TrainArgs, {"seed": -1, "weight_decay": -0.1}, ["--seed must be in 0..4294967295, got -1",
                                                     "--weight-decay must be >= 0"]),
    (TrainArgs, {"seed": 2**64}, ["--seed must be in 0..4294967295"]),
    (DataArgs, {"data_seed": -3}, ["--data-seed must be in 0..4294967295, got -3"]),
    (PromptArgs, {"vocab_sample_size": 0, "encoder_hidden_size": -1},
     ["--vocab-sample-size must be >= 1, got 0", "--encoder-hidden-size must be >= 0, got -1"]),
])
def test_int_fields_in_range_all_reported(cls, values, needles):
    with pytest.raises(ConfigError) as err:
        cls(**values)
    for needle in needles:
        assert needle in str(err.value)


def test_output_dir_must_be_a_folder_to_create(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ConfigError, match=rf"--output-dir {afile}: exists and is not a folder"):
        TrainArgs(output_dir=str(afile))
    with pytest.raises(ConfigError, match=rf"--output-dir {afile / 'run'}: {afile} is not a folder"):
        TrainArgs(output_dir=str(afile / "run"))
    assert TrainArgs(output_dir=str(tmp_path / "new" / "run")).output_dir  # to be created: fine
    assert check_folder_to_create("--store", tmp_path) is None


@pytest.mark.parametrize(("text", "needle"), [
    ("lr: .inf", "train.lr must be a finite number, got inf"),
    ("lr: .nan", "train.lr must be a finite number, got nan"),
    ("lr: abc", "train.lr: expected float, got 'abc'"),
    ("lr: [1]", "train.lr: expected float, got [1]"),
    ("weight_decay: -1", "train.weight_decay must be >= 0"),
    ("lr: 1" + "0" * 400, "train.lr: expected float, got an integer of 401 digits (out of the float range)"),
])
def test_yaml_values_are_checked_and_named_by_file_and_key(tmp_path, text, needle):
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  {text}\n")
    with pytest.raises(ConfigError) as err:
        build_args(TrainArgs, load_yaml(path)["train"], {}, origins=[f"{path}: train.", None])
    assert f"{path}: {needle}" in str(err.value)
    assert "--lr" not in str(err.value) and "--weight-decay" not in str(err.value)


def test_a_flag_overriding_a_bad_yaml_value_is_named_as_the_flag(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        build_args(TrainArgs, load_yaml(path)["train"], {"lr": math.inf}, origins=[f"{path}: train.", None])
    assert "--lr must be a finite number, got inf" in str(err.value) and "train.lr" not in str(err.value)


def test_generate_flags_checked_together():
    problems = generate_flag_problems(max_new_tokens=0, temperature=math.nan, top_k=-1, top_p=1.5, seed=-1)
    text = "\n".join(problems)
    for needle in ("--max-new-tokens must be >= 1", "--temperature must be a finite number, got nan",
                   "--top-k must be >= 0", "--top-p must be in (0, 1]", "--seed must be in 0..4294967295"):
        assert needle in text
    assert generate_flag_problems(max_new_tokens=1, temperature=0.7, top_k=0, top_p=1.0, seed=0) == []
    assert generate_flag_problems(max_new_tokens=1, temperature=0, top_k=0, top_p=1.0, seed=None) == []


@pytest.mark.parametrize("flags, named", [({"top_k": 5}, "--top-k only apply"), ({"top_p": 0.9}, "--top-p only"),
                                          ({"seed": 3}, "--seed only apply"),
                                          ({"top_k": 5, "top_p": 0.5, "seed": 0}, "--top-k, --top-p, --seed only")])
def test_generate_refuses_sampling_flags_at_temperature_zero(flags, named):
    # at --temperature 0 (the default) decoding is greedy: --top-k 50 --seed 3 changed nothing, in silence
    given = {"max_new_tokens": 1, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": None, **flags}
    problems = generate_flag_problems(**given)
    assert len(problems) == 1 and named in problems[0] and "give --temperature > 0 to sample" in problems[0]
    assert generate_flag_problems(**{**given, "temperature": 0.5}) == []


def test_context_length_of_model_families():
    from transformers import GPT2Config, LEDConfig, LlamaConfig, T5Config

    assert context_length(LlamaConfig(max_position_embeddings=256)) == (256, "max_position_embeddings")
    assert context_length(GPT2Config(n_positions=128)) == (128, "max_position_embeddings")
    assert context_length(T5Config()) is None  # relative positions: no hard limit
    # an encoder-decoder whose limit is its encoder's (the prompt and text go there): it read as no limit
    assert context_length(LEDConfig(max_encoder_position_embeddings=4096)) == (4096, "max_encoder_position_embeddings")


def test_fit_max_length():
    ctx = (256, "max_position_embeddings")
    assert fit_max_length(None, "--model t5", 5000, 256, given=True) == 256  # no limit known: nothing to check
    assert fit_max_length(ctx, "--model m", 4, 200, given=True) == 200
    assert fit_max_length(ctx, "--model m", 100, 256, given=False) == 156  # a default length is lowered to fit
    with pytest.raises(ConfigError) as err:
        fit_max_length(ctx, "--model m", 100, 200, given=True)
    msg = str(err.value)
    assert "--num-virtual-tokens 100 + --max-length 200 = 300 tokens" in msg and "context of 256" in msg
    assert "156 are left for text" in msg
    for p in (300, 250):
        with pytest.raises(ConfigError) as err:
            fit_max_length(ctx, "--model m", p, 256, given=False)
        msg = str(err.value)
        assert f"--num-virtual-tokens {p}" in msg and "256 positions (max_position_embeddings)" in msg
        assert "at most 248" in msg


def test_a_sample_cap_of_0_is_the_whole_split_and_below_0_is_refused():
    # the validation split's default cap of 300 could not be lifted: null kept the default, 0 was refused
    from softprompt.config import DataArgs

    assert DataArgs().max_samples() == {"validation": 300}
    assert DataArgs(max_validation_samples=0, max_train_samples=5).max_samples() == {"train": 5}
    with pytest.raises(ConfigError, match=r"--max-test-samples must be >= 0 \(0: the whole split\), got -1"):
        DataArgs(max_test_samples=-1)


def test_a_config_files_template_is_read_as_the_flag_reads_it(tmp_path):
    """`template: 'Text: {text}\\nLabel:'` (single quotes keep the backslash) gave a one-line prompt with a backslash
    and an n in it, where --template with the same text gave two lines."""
    from softprompt.config import template_flag

    flag_value = template_flag(r"Text: {text}\nLabel:")
    for quoted in (r"'Text: {text}\nLabel:'", r'"Text: {text}\nLabel:"'):  # YAML's escape, or the flag's
        path = tmp_path / "c.yaml"
        path.write_text(f"data:\n  template: {quoted}\n")
        assert load_yaml(path)["data"]["template"] == flag_value == "Text: {text}\nLabel:"
    # a run's config.yaml gives back the template it ran with, a literal backslash included
    data = DataArgs(template="a\\n {x}\tb\\\\c\n")
    path.write_text(to_yaml({"data": data}))
    assert load_yaml(path)["data"]["template"] == data.template


def test_a_config_files_verbalizer_may_be_a_mapping(tmp_path):
    """`verbalizer: {1: "yes", 0: "no"}` was refused as "expected str"."""
    from softprompt.data import DataError, parse_verbalizer

    path = tmp_path / "c.yaml"
    path.write_text('data:\n  verbalizer: {1: "yes", 0: "no"}\n')
    data = build_args(DataArgs, load_yaml(path)["data"], origins=["c.yaml: data."])
    assert parse_verbalizer(data.verbalizer) == {"1": "yes", "0": "no"}
    path.write_text(to_yaml({"data": data}))
    assert load_yaml(path)["data"]["verbalizer"] == data.verbalizer  # a run's config.yaml repeats it
    with pytest.raises(ConfigError, match=r"c\.yaml: data\.verbalizer: expected str, got \['a'\]"):
        build_args(DataArgs, {"verbalizer": ["a"]}, origins=["c.yaml: data."])
    path.write_text("data:\n  verbalizer: {positive: yes, negative: no}\n")  # YAML booleans, not the words
    with pytest.raises(DataError, match="got True .YAML reads yes/no/on/off/true/false as booleans: quote it"):
        parse_verbalizer(load_yaml(path)["data"]["verbalizer"])

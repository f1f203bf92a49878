"""Where a key/value prefix (prefix_tuning, deep_prompt) cannot work, it is refused up front with a clear error."""

from __future__ import annotations

import pytest

from softprompt.config import ConfigError, TrainArgs
from softprompt.methods import build_method
from softprompt.train import train
from tests import test_cli
from tests.conftest import make_model
from tests.test_cli import _assert_usage_error, train_argv
from tests.test_train import task

env = test_cli.env  # the tiny model folders and jsonl files (a module fixture)


def _no_model(monkeypatch):
    """Make loading the model fail loudly: a refusal must come before it."""
    import softprompt.workflows.distilling as distilling
    import softprompt.workflows.training as training
    import softprompt.workflows.tuning as tuning

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded: the arguments were not refused up front")

    for module in (training, tuning, distilling):
        monkeypatch.setattr(module, "load_model_from_args", refuse)


@pytest.mark.parametrize("method", ["prefix_tuning", "deep_prompt"])
def test_train_refuses_a_prefix_with_gradient_checkpointing_before_the_model_loads(env, tmp_path, monkeypatch,
                                                                                     method):
    # transformers sets cache=None inside a checkpointed layer, and the prefix is that cache: the run crashed at
    # its first step with "The size of tensor a (7) must match the size of tensor b (11)"
    _no_model(monkeypatch)
    _assert_usage_error(train_argv(env, tmp_path / "o", "--method", method, "--gradient-checkpointing"),
                        f"--method {method} cannot train with --gradient-checkpointing",
                        "transformers drops that cache inside a checkpointed layer")
    assert not (tmp_path / "o").exists()


def test_tune_and_distill_refuse_a_prefix_with_gradient_checkpointing_before_the_model_loads(env, tmp_path,
                                                                                            monkeypatch):
    _no_model(monkeypatch)
    tune = ["tune", *train_argv(env, tmp_path / "t", "--gradient-checkpointing")[1:]]
    _assert_usage_error([*tune, "--method", "deep_prompt"], "--method deep_prompt cannot train with "
                        "--gradient-checkpointing")
    err = _assert_usage_error([*tune, "--search", "method=prefix_tuning,deep_prompt"], "no valid combination",
                              "--method prefix_tuning cannot train with --gradient-checkpointing")
    assert "--method deep_prompt cannot train" in err
    _assert_usage_error(["distill", "--model", env["model"], "--context", "a good movie", "--sample-inputs", "4",
                         "--method", "prefix_tuning", "--gradient-checkpointing", "--output-dir", tmp_path / "d"],
                        "--method prefix_tuning cannot train with --gradient-checkpointing")
    assert not (tmp_path / "d").exists()


def test_a_search_drops_prefix_trials_under_gradient_checkpointing_with_a_note():
    from softprompt.config import PromptArgs
    from softprompt.tune import TuneArgs, trial_specs

    specs, notes = trial_specs(TuneArgs(lrs=[0.1], search={"method": ["prompt_tuning", "prefix_tuning"]}),
                               PromptArgs(init="random"), TrainArgs(gradient_checkpointing=True))
    assert {s.method for s in specs} == {"prompt_tuning"}
    assert any("--method prefix_tuning cannot train with --gradient-checkpointing" in n for n in notes)


def test_train_refuses_a_prefix_with_gradient_checkpointing(tmp_path, tokenizer):
    model = make_model("llama")
    method = build_method("deep_prompt", {"num_virtual_tokens": 4, "init": "random"}, model, tokenizer)
    with pytest.raises(ConfigError, match="--method deep_prompt cannot train with --gradient-checkpointing"):
        train(model, tokenizer, method, task(), TrainArgs(output_dir=str(tmp_path / "o"), max_steps=2,
                                                          gradient_checkpointing=True))
    assert not (tmp_path / "o").exists() and not model.is_activation_checkpointing

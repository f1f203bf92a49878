"""The ``distill`` subcommand: compress a long hard context into a soft prompt
(:mod:`softprompt.workflows.distilling`)."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

from softprompt.config import ConfigError, build_args, given, load_yaml, store_task_problems

DEFAULT_OUTPUT_DIR = "runs/distill"


def cmd_distill(ns: argparse.Namespace, resolve: Callable) -> int:
    """Distill the context into a prompt, report it against the teacher, save it; 1 if training diverged."""
    from softprompt.workflows.distilling import DistillArgs

    problems = store_task_problems(ns.store, ns.task, labelled=False)  # a distilled prompt has no labels
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(DistillArgs) if getattr(ns, f.name) is not None}
    # the distill section of --config (the config.yaml a run writes has one) under the flags
    config = load_yaml(ns.config, ("distill",)) if ns.config else {}
    section = config.get("distill", {})
    problems += [f"{ns.config}: distill reads no {s}: section (its inputs and --max-length are in the distill "
                 "section); remove it" for s in ("data", "eval") if s in config]
    names = {f.name for f in dataclasses.fields(DistillArgs)}
    problems += [f"{ns.config}: distill.{k} is not a known field (known: {', '.join(sorted(names))})"
                 for k in section if k not in names]
    distill = None
    try:
        distill = build_args(DistillArgs, {k: v for k, v in section.items() if k in names}, values,
                             origins=[f"{ns.config}: distill.", None])
    except ConfigError as e:
        problems.append(str(e).replace("invalid arguments:\n  ", ""))
    if not given(ns, "train", "output_dir"):  # before the checks: train's default folder was checked instead
        ns.output_dir = DEFAULT_OUTPUT_DIR
    args = resolve(ns, ["model", "prompt", "train"], [p for p in problems if p])
    train = args["train"]  # the training inputs have no validation split: these would be dropped in silence
    ignored = [f"{flag}: distill validates nothing while it trains (the report's held-out inputs are measured "
               "after); leave it out" for flag, on in (("--stop-when-flat", train.stop_when_flat),
                                                       ("--early-stopping-patience", train.early_stopping_patience),
                                                       ("--metric", train.metric not in ("auto", "loss"))) if on]
    if ignored:
        raise ConfigError("invalid arguments:\n  " + "\n  ".join(ignored))
    from softprompt.workflows.distilling import distill_and_save

    report = distill_and_save(args, distill, store=ns.store, store_task=ns.task)
    return 1 if report["diverged"] else 0


def add_distill_parser(sub, add_section: Callable, resolve: Callable) -> None:
    """Add ``distill`` to the subcommands ``sub``; ``add_section`` adds a config section's flags to a parser and
    ``resolve`` builds the sections from a namespace (the CLI's own)."""
    p = sub.add_parser(
        "distill", help="compress a long hard context (system prompt, k-shot examples, document) into a soft prompt",
        description="Train a soft prompt so that the model with it (the student) matches the model with the "
                    "context in front (the teacher, keys/values cached once): KL(teacher || student) of the "
                    "next-token distributions at every input position. Report on held-out inputs: the KL of the "
                    "student at init and after, of the model without the context, greedy agreement with the "
                    "teacher, and the tokens saved per request; save a normal stored prompt (distill.json, "
                    "prompt/). Decoder-only language models only.",
        epilog="exit status: 0 when the run finished; 1 when the divergence guard ended it (the prompt is saved, "
               "not added to --store); 2 for invalid arguments or inputs")
    p.add_argument("--config", help="YAML file with model/prompt/train sections and a distill section (the flags "
                                    "below; a run's config.yaml has them all)")
    p.set_defaults(config_extra=("distill",))
    p.add_argument("--context", help="the context text")
    p.add_argument("--context-file", help="a file holding the context text")
    p.add_argument("--inputs-file", help="inputs: one per non-blank line, or --text-field of a .jsonl/.csv file")
    p.add_argument("--text-field", help="the input field of a record --inputs-file")
    p.add_argument("--sample-inputs", type=int, help="instead of a file: sample N inputs from the model after the "
                                                    "context (temperature 1, --sample-length tokens, --data-seed)")
    p.add_argument("--sample-length", type=int, help="tokens per sampled input (default 24)")
    p.add_argument("--held-out", type=float, help="share of the inputs held out for the report (default 0.1)")
    p.add_argument("--distill-temperature", type=float, help="softmax temperature of the training KL (default 1; "
                                                            "the loss is scaled by its square)")
    p.add_argument("--max-new-tokens", type=int, help="greedy tokens compared with the teacher's (default 8)")
    p.add_argument("--max-length", type=int, help="tokens per input; longer ones are cut into windows (default 256)")
    p.add_argument("--data-seed", type=int, help="seed of the held-out split and the sampled inputs (default 13)")
    p.add_argument("--store", help="also add the prompt to this prompt store (created if missing)")
    p.add_argument("--task", help="task name in --store")
    for s in ("model", "prompt", "train"):
        add_section(p, s)
    p.set_defaults(func=lambda ns: cmd_distill(ns, resolve))

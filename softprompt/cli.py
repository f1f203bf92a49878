"""Command line: ``softprompt train | tune | eval | generate | serve | compare | distill | inspect | store``.

Each subcommand is a plain function that checks its flags, resolves the config sections and calls what
does the work: :mod:`softprompt.workflows` (train, eval, generate), :mod:`softprompt.server.assemble`
(serve), :mod:`softprompt.compare`, or the store and inspect commands (:mod:`softprompt.cli_store`,
:mod:`softprompt.cli_inspect`).

Flags come from the dataclasses in :mod:`softprompt.config`; ``--config file.yaml`` supplies the same
fields grouped by section, and flags given on the command line win.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from softprompt.cli_compare import add_compare_parser
from softprompt.cli_distill import add_distill_parser
from softprompt.cli_inspect import add_inspect_parser
from softprompt.cli_store import add_store_parsers, parse_members
from softprompt.config import (
    SECTIONS,
    ConfigError,
    build_args,
    check_file_to_write,
    field_type,
    flag,
    generate_flag_problems,
    given,
    load_yaml,
    store_task_problems,
    template_flag,
    to_yaml,
)
from softprompt.config.sections import method_default_help


def _add_section(parser: argparse.ArgumentParser, section: str) -> None:
    cls = SECTIONS[section]
    group = parser.add_argument_group(f"{section} ({cls.__doc__.strip()})")
    for f in dataclasses.fields(cls):
        typ = field_type(cls, f)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = f"default: {default!r}" if section != "prompt" else method_default_help(f.name, default)
        if typ is bool:
            group.add_argument(flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=help_)
        elif typ is list:
            group.add_argument(flag(f.name), dest=f.name, default=None, help=help_ + " (comma-separated)")
        elif f.name == "template":
            group.add_argument(flag(f.name), dest=f.name, type=template_flag, default=None,
                               help=help_ + " (\\n, \\t: a newline, a tab)")
        else:
            group.add_argument(flag(f.name), dest=f.name, type=typ, default=None, help=help_)


def _resolve(ns: argparse.Namespace, sections: list[str], problems: list[str] | None = None) -> dict:
    """Build the section dataclasses from defaults < --config YAML < flags.

    ``problems`` already found with the command's other flags are reported in the same error.
    """
    yaml_cfg = load_yaml(ns.config, getattr(ns, "config_extra", ())) if getattr(ns, "config", None) else {}
    problems, out = list(problems or []), {}
    for s in sections:
        cli_vals = {f.name: getattr(ns, f.name) for f in dataclasses.fields(SECTIONS[s])}
        try:
            out[s] = build_args(SECTIONS[s], yaml_cfg.get(s, {}), cli_vals, origins=[f"{ns.config}: {s}.", None])
        except (ConfigError, ValueError) as e:
            problems.append(str(e).replace("invalid arguments:\n  ", ""))
    if problems:
        raise ConfigError("invalid arguments:\n  " + "\n  ".join(problems))
    return out


def cmd_train(ns: argparse.Namespace) -> int:
    """Train a prompt, evaluate it against the baselines on the test split, save it."""
    problems = store_task_problems(ns.store, ns.task)
    args = _resolve(ns, ["model", "data", "prompt", "train", "eval"], problems)
    if ns.print_config:
        print(to_yaml(args), end="")
        return 0
    from softprompt.workflows import fit_context, train_and_save

    fit_context(args, given(ns, "data", "max_length"))
    result = train_and_save(args, store=ns.store, store_task=ns.task, split_given=given(ns, "eval", "split"))
    return 1 if result is not None and result.diverged else 0


def cmd_tune(ns: argparse.Namespace) -> int:
    """Search the learning rate (and --search settings) by successive halving on validation; save the best."""
    from softprompt.tune import ignored_eval_flags, ignored_train_flags, tune_args_from_namespace

    tune, problems = tune_args_from_namespace(ns)
    args = _resolve(ns, ["model", "data", "prompt", "train", "eval"], problems)
    ignored = ignored_train_flags(args["train"], tune, given(ns, "train", "epochs")) + ignored_eval_flags(args["eval"])
    if ignored:
        raise ConfigError("invalid arguments:\n  " + "\n  ".join(ignored))
    if ns.print_config:
        print(to_yaml(args), end="")
        return 0
    from softprompt.workflows import tune_and_save

    return 0 if tune_and_save(args, tune, given(ns, "data", "max_length")).best is not None else 1


def cmd_eval(ns: argparse.Namespace) -> int:
    """Evaluate a stored prompt and baselines on a split of its task, or several tasks of a store."""
    problems = ["give either --prompt DIR or --store DIR [--task a,b,...]"] if bool(ns.prompt) == bool(ns.store) else []
    if ns.task is not None and not ns.store:
        problems.append("--task names tasks of a store: give --store DIR")
    elif ns.task is not None and not parse_members(ns.task):
        problems.append(f"--task {ns.task!r} names no task: give comma-separated entry names, e.g. --task a,b")
    if ns.report:
        problems.append(check_file_to_write("--report", ns.report))
    args = _resolve(ns, ["model", "data", "eval"], [p for p in problems if p])
    from softprompt.evaluate import format_report
    from softprompt.workflows import evaluate_store, evaluate_stored_prompt
    from softprompt.workflows.evaluation import RECORDED

    split, check = args["eval"].split, not ns.no_fingerprint_check
    set_data = {f for f in RECORDED if given(ns, "data", f)}  # the others: the training run's
    if ns.store:
        tasks = parse_members(ns.task) if ns.task is not None else None
        report = evaluate_store(args, ns.store, tasks, check_fingerprint=check, given=set_data)
        print(f"{split} split, store {ns.store}:")
    else:
        asked = given(ns, "eval", "baselines") or given(ns, "eval", "k_shot")  # not the default baselines
        report, n = evaluate_stored_prompt(args, ns.prompt, check_fingerprint=check, given=set_data, k_shot_asked=asked)
        print(f"{split} split ({n} examples), prompt {ns.prompt}:")
    print(format_report(report))
    if ns.report:
        Path(ns.report).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.report).write_text(json.dumps(report, indent=2))
    return 0


def cmd_generate(ns: argparse.Namespace) -> int:
    """Generate with a stored prompt, a store's task, or the plain base model, for one or more inputs."""
    problems = [] if bool(ns.input) != bool(ns.messages) else ["give --input TEXT (repeatable) or --messages FILE|JSON"]
    if ns.messages and ns.raw:  # a conversation is always rendered with the chat format
        problems.append("--raw applies to --input text; --messages is rendered with the chat template")
    if ns.prompt and (ns.store or ns.task):  # checked before the model loads (the store silently won)
        problems.append("--prompt DIR and --store DIR --task NAME both name the prompt: give one")
    elif ns.store and not ns.task:
        problems.append("--store needs --task NAME (see `softprompt store list --store DIR`)")
    elif ns.task and not ns.store:
        problems.append("--task needs --store DIR")
    args = _resolve(ns, ["model"], problems + generate_flag_problems(ns.max_new_tokens, ns.temperature,
                                                                     ns.top_k, ns.top_p, ns.seed))
    from softprompt.data.chat import conversation_prompt
    from softprompt.engine import GenerateRequest
    from softprompt.workflows import engine_for, load_model_from_args
    from softprompt.workflows.generation import answer_budget, generation_inputs, input_values, output_row

    conversations = generation_inputs(ns.messages, ns.prompt, ns.store, ns.task)  # bad ones fail before the model loads
    model, tok = load_model_from_args(args)
    engine, task = engine_for(model, tok, prompt=ns.prompt, store=ns.store, task=ns.task,
                              check_fingerprint=not ns.no_fingerprint_check)
    fmt = engine.task(task).formats[0]
    if conversations:  # the task's chat format, or (none: base model, PEFT folder) the tokenizer's, as the server's
        texts, raw, stop = [conversation_prompt(tok, fmt, c) for c in conversations], True, ns.stop or ""
    else:
        texts, raw, stop = input_values(engine, task, ns.input, ns.raw), ns.raw, "\n" if ns.stop is None else ns.stop
    budget = ns.max_new_tokens or answer_budget(engine, task, chat=bool(conversations))
    reqs = [GenerateRequest(task, text, raw=raw, max_tokens=budget, temperature=ns.temperature,
                            top_k=ns.top_k, top_p=ns.top_p, seed=(ns.seed or 0) + i if ns.temperature > 0 else None,
                            stop=[stop] if stop else [], chat=bool(conversations) and fmt is None)
            for i, text in enumerate(texts)]
    for res in engine.generate(reqs):
        print(json.dumps(output_row(engine, task, res, chat=bool(conversations), cut=ns.max_new_tokens is None),
                         ensure_ascii=False))
    return 0


def cmd_serve(ns: argparse.Namespace) -> int:
    """Serve every task of a store (and the base model) over HTTP until interrupted."""
    try:
        import uvicorn
    except ImportError as e:
        raise ConfigError("softprompt serve needs the server extra: pip install -e '.[serve]'") from e
    args = _resolve(ns, ["model", "serve"])
    from softprompt.server.assemble import build_app, check_listen

    check_listen(args["serve"].host, args["serve"].port)
    uvicorn.run(build_app(args), host=args["serve"].host, port=args["serve"].port, log_level="info")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="softprompt", description="Prompt tuning for frozen language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train", help="train a soft prompt, evaluate it against baselines, save it",
        epilog="exit status: 0 when the run finished; 1 when the divergence guard ended it (after --max-rollbacks "
               "rollbacks: the best prompt seen is still evaluated and saved, but not added to --store); 2 for "
               "invalid arguments or inputs")
    p.add_argument("--config", help="YAML file with model/data/prompt/train/eval sections")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--store", help="also add the trained prompt to this prompt store (created if missing)")
    p.add_argument("--task", help="task name in --store")
    for s in ("model", "data", "prompt", "train", "eval"):
        _add_section(p, s)
    p.set_defaults(func=cmd_train)

    from softprompt.tune import add_tune_arguments

    p = sub.add_parser(
        "tune", help="search the learning rate (and prompt length, init, method) by successive halving",
        description="Train trials with different settings, keep the best third by validation metric after each "
                    "rung and continue them from their checkpoints; write trials.md/json/png and save the best "
                    "prompt (optionally the top-k as a store ensemble). The test split is never read.",
        epilog="exit status: 0 with a best prompt saved; 1 when every trial diverged or failed; 2 for invalid "
               "arguments")
    p.add_argument("--config", help="YAML file with model/data/prompt/train/eval sections")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    for s in ("model", "data", "prompt", "train", "eval"):
        _add_section(p, s)
    add_tune_arguments(p)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("eval", help="evaluate a stored prompt and baselines on its task")
    p.add_argument("--prompt", help="stored prompt folder (evaluated with the baselines)")
    p.add_argument("--store", help="prompt store folder: evaluate its tasks (or --task a,b) on their datasets")
    p.add_argument("--task", help="comma-separated tasks of --store (default: all)")
    p.add_argument("--config", help="YAML file with model/data/eval sections")
    p.add_argument("--report", help="write the metrics as JSON here")
    p.add_argument("--no-fingerprint-check", action="store_true", help="load a prompt saved for another model")
    for s in ("model", "data", "eval"):
        _add_section(p, s)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="generate text with a stored prompt")
    p.add_argument("--prompt", help="stored prompt folder (omit for the plain base model)")
    p.add_argument("--store", help="prompt store folder (with --task)")
    p.add_argument("--task", help="task in --store to generate with")
    p.add_argument("--input", action="append",
                   help="input text, filled into the prompt's template (repeatable); a template with several "
                        "fields takes a JSON object, e.g. '{\"country\": \"France\", \"lang\": \"fr\"}'")
    p.add_argument("--messages", help="a chat conversation to continue as the assistant: JSON text or a file (a "
                                      "messages list, {\"messages\": [...]}, or .jsonl with one per line)")
    p.add_argument("--raw", action="store_true", help="use --input as the whole text, without the template")
    p.add_argument("--config", help="YAML file with a model section")
    p.add_argument("--max-new-tokens", type=int, help="default: 16; for a classification prompt its longest label")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, help="seed of the first input's sampler (+1 per input; default 0)")
    p.add_argument("--stop", default=None, type=template_flag, help="cut the output at this string ('' to keep "
                   "all; default: newline, none with --messages; \\n, \\t: a newline, a tab, as in --template)")
    p.add_argument("--no-fingerprint-check", action="store_true", help="load a prompt saved for another model")
    _add_section(p, "model")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="serve a store's tasks over HTTP (OpenAI-compatible)")
    p.add_argument("--config", help="YAML file with model/serve sections")
    for s in ("model", "serve"):
        _add_section(p, s)
    p.add_argument("--max-batch-size", dest="max_batch_requests", type=int, help=argparse.SUPPRESS)  # old name
    p.set_defaults(func=cmd_serve)

    add_compare_parser(sub)
    add_distill_parser(sub, _add_section, _resolve)
    add_store_parsers(sub)
    add_inspect_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``softprompt`` command; returns the exit status."""
    if getattr(sys.stdout, "errors", None) == "strict" and hasattr(sys.stdout, "reconfigure"):  # stderr's already is:
        sys.stdout.reconfigure(errors="backslashreplace")  # a non-UTF-8 path (surrogate escapes) prints, no crash
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from softprompt.assets import AssetError
    from softprompt.data import DataError
    from softprompt.engine import EngineError
    from softprompt.model import ModelLoadError
    from softprompt.store import StoreError

    try:
        return ns.func(ns)
    except (ConfigError, DataError, StoreError, ModelLoadError, AssetError, EngineError) as e:
        print(f"softprompt {ns.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

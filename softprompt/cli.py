"""Command line: ``softprompt train | eval | generate | serve | compare | inspect | store | ensemble``.

Each subcommand is a plain function.

Flags come from the dataclasses in :mod:`softprompt.config`; ``--config file.yaml`` supplies the same
fields grouped by section, and flags given on the command line win.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

from softprompt.cli_inspect import add_inspect_parser
from softprompt.cli_store import add_store_parsers
from softprompt.config import (
    DEFAULT_MODEL,
    SECTIONS,
    ConfigError,
    build_args,
    check_file_to_write,
    check_folder_to_create,
    field_type,
    fit_max_length,
    flag,
    generate_flag_problems,
    given,
    load_yaml,
    to_yaml,
)

log = logging.getLogger("softprompt")


def _add_section(parser: argparse.ArgumentParser, section: str) -> None:
    cls = SECTIONS[section]
    group = parser.add_argument_group(f"{section} ({cls.__doc__.strip()})")
    for f in dataclasses.fields(cls):
        typ = field_type(cls, f)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = f"default: {default!r}"
        if typ is bool:
            group.add_argument(flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=help_)
        elif typ is list:
            group.add_argument(flag(f.name), dest=f.name, default=None, help=help_ + " (comma-separated)")
        else:
            group.add_argument(flag(f.name), dest=f.name, type=typ, default=None, help=help_)


def _resolve(ns: argparse.Namespace, sections: list[str], problems: list[str] | None = None) -> dict:
    """Build the section dataclasses from defaults < --config YAML < flags.

    ``problems`` already found with the command's other flags are reported in the same error.
    """
    yaml_cfg = load_yaml(ns.config) if getattr(ns, "config", None) else {}
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


def _task_meta(data_args, fmt) -> dict:
    """The ``task`` record stored with a prompt trained on ``fmt`` (labels: a classification head's order)."""
    from softprompt.store.task_record import TaskRecord

    return TaskRecord.from_format(fmt, data_args.dataset).to_dict()


def _load_task(data_args, stored_task=None, classifier: bool = False):
    """Load the task; unset data flags fall back to the stored prompt's task, then to rotten_tomatoes.

    ``stored_task`` is the prompt's validated :class:`~softprompt.store.task_record.TaskRecord` (or None).
    A stored prompt's recorded label order is kept; for a ``classifier`` prompt (its head's outputs are
    those labels in that order) the task must have exactly those labels.
    """
    from softprompt.data import load_task, order_verbalizer, parse_verbalizer
    from softprompt.store.task_record import TaskRecord

    stored_task = stored_task or TaskRecord()
    dataset = data_args.dataset
    if dataset is None and not data_args.uses_files():
        dataset = stored_task.dataset or "rotten_tomatoes"
        data_args.dataset = dataset
    verbalizer = parse_verbalizer(data_args.verbalizer) if data_args.verbalizer else stored_task.verbalizer
    labels = None if stored_task.labels is None else list(stored_task.labels)
    verbalizer = order_verbalizer(verbalizer, labels)
    if classifier and labels is not None and list(verbalizer or {}) != labels:
        raise ConfigError(f"--verbalizer labels {sorted(verbalizer or {})} differ from the {len(labels)} classes "
                          f"the prompt's head was trained on ({', '.join(labels)})")
    return load_task(
        dataset=dataset, train_file=data_args.train_file, validation_file=data_args.validation_file,
        test_file=data_args.test_file, template=data_args.template or stored_task.template,
        target_field=data_args.target_field or stored_task.target_field,
        verbalizer=verbalizer, max_samples=data_args.max_samples(), seed=data_args.data_seed)


def _load_model(args: dict, stored=None, num_labels: int | None = None):
    """The base model of the ``model`` section; ``--task-type auto`` follows a stored prompt's task type."""
    from softprompt.model import load_base_model

    m = args["model"]
    task_type = m.task_type
    if task_type == "auto" and stored is not None and stored.peft_config.get("task_type") == "SEQ_CLS":
        task_type = "seq_cls"
    return load_base_model(m.model, m.device, m.dtype, task_type=task_type, num_labels=num_labels)


def _classifier_baselines(model, tokenizer, task, args, examples, tuned) -> dict:
    """A sequence classifier's report: the tuned prompt with its head, and the head without the prompt.

    Hard-prompt and k-shot baselines rank label words with an LM head, which an encoder classifier lacks.
    """
    from softprompt.evaluate import evaluate_prompt
    from softprompt.methods import PromptOutput

    ev, data = args["eval"], args["data"]
    skipped = [b for b in ev.baselines if b != "no_prompt"]
    if skipped:
        log.info("baselines %s need an LM head; %s has a classification head: skipped", ", ".join(skipped),
                 type(model).__name__)
    conditions = {"tuned head, no prompt": PromptOutput(head=tuned.head)} if "no_prompt" in ev.baselines else {}
    conditions["tuned soft prompt"] = tuned
    return {name: evaluate_prompt(model, tokenizer, prompt, examples, task.format, ev.eval_batch_size,
                                  max_length=data.max_length)[0] for name, prompt in conditions.items()}


def _baselines(model, tokenizer, task, args, prompt_text: str, examples, kv_tuned=None) -> dict:
    """Evaluate the tuned prompt (if given) and the requested baselines on ``examples``.

    Every condition is a task of one :class:`Engine` (the hard-prompt and k-shot contexts become cached
    keys/values like a soft prompt), so all of them run in shared, length-sorted batches. An
    encoder-decoder, which the engine does not serve, is evaluated condition by condition.
    """
    from softprompt import inject
    from softprompt.engine import Engine
    from softprompt.evaluate import evaluate_on_engine, evaluate_prompt, hard_prompt_kv, k_shot_text

    ev, data, fmt = args["eval"], args["data"], task.format
    if inject.is_sequence_classifier(model):
        return _classifier_baselines(model, tokenizer, task, args, examples, kv_tuned)
    conditions: dict[str, object] = {}
    if "no_prompt" in ev.baselines:
        conditions["no soft prompt (template only)"] = None
    if "hard_prompt" in ev.baselines and prompt_text.strip():
        conditions["init text as hard prompt"] = hard_prompt_kv(model, tokenizer, prompt_text.strip() + "\n")
    if "k_shot" in ev.baselines and task.splits.get("train"):
        shots = k_shot_text(task.examples("train"), fmt, ev.k_shot, seed=data.data_seed)
        conditions[f"{ev.k_shot}-shot prompting"] = hard_prompt_kv(model, tokenizer, shots)
    if kv_tuned is not None:
        conditions["tuned soft prompt"] = kv_tuned
    t0 = time.perf_counter()
    if inject.is_seq2seq(model):
        report = {name: evaluate_prompt(model, tokenizer, kv, examples, fmt, ev.eval_batch_size, ev.max_new_tokens,
                                        data.max_length)[0] for name, kv in conditions.items()}
    else:
        engine = Engine(model, tokenizer, max_batch_size=ev.eval_batch_size, max_input_tokens=data.max_length,
                        truncate=True, progress=True)
        runs = {}
        for i, (name, kv) in enumerate(conditions.items()):
            task_name = f"condition{i}"
            (engine.add_base(task_name, fmt) if kv is None else engine.add_kv(task_name, kv, fmt))
            runs[name] = task_name
        report = evaluate_on_engine(engine, runs, examples, fmt, ev.max_new_tokens)
    log.info("evaluated %d conditions x %d examples in %.1fs", len(conditions), len(examples),
             time.perf_counter() - t0)
    return report


def _fit_context(ns: argparse.Namespace, args: dict) -> None:
    """Refuse a prompt too long for the model's context before any data or weights are loaded.

    Only the model's config is read. A default ``--max-length`` is lowered to what fits beside the prompt.
    """
    from softprompt.model import context_length, load_model_config

    name, data = args["model"].model, args["data"]
    data.max_length = fit_max_length(context_length(load_model_config(name)), f"--model {name}",
                                     args["prompt"].num_virtual_tokens, data.max_length,
                                     given(ns, "data", "max_length"))


def cmd_train(ns: argparse.Namespace) -> int:
    """Train a prompt, evaluate it against the baselines on the test split, save it."""
    import torch

    from softprompt import inject
    from softprompt.evaluate import format_report
    from softprompt.methods import build_method
    from softprompt.plots import plot_curves
    from softprompt.store import load_prompt, save_prompt
    from softprompt.train import train

    problems = []
    if bool(ns.store) != bool(ns.task):
        problems.append("--store and --task go together: --store DIR --task NAME")
    if ns.store:
        problems.append(check_folder_to_create("--store", ns.store))
    if ns.task:
        from softprompt.store import StoreError, safe_task_name

        try:
            safe_task_name(ns.task)
        except StoreError as e:
            problems.append(str(e))
    args = _resolve(ns, ["model", "data", "prompt", "train", "eval"], [p for p in problems if p])
    if ns.print_config:
        print(to_yaml(args), end="")
        return 0
    _fit_context(ns, args)
    task = _load_task(args["data"])
    task.examples("train")  # fail before anything is written or loaded if there is nothing to train on
    if args["prompt"].init_text is None:  # fits the task being trained; config.yaml records the text used
        from softprompt.data import default_init_text

        args["prompt"].init_text = default_init_text(args["data"].dataset, task.format)
    out = Path(args["train"].output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(args))
    fmt = task.format
    print(f"task: {args['data'].dataset or args['data'].train_file}  "
          + "  ".join(f"{k}={len(v)}" for k, v in task.splits.items()))
    t0 = time.perf_counter()
    model, tok = _load_model(args, num_labels=len(fmt.labels) if fmt.is_classification else None)
    log.info("loaded %s in %.1fs", args["model"].model, time.perf_counter() - t0)
    if inject.is_sequence_classifier(model) and not fmt.is_classification:
        raise ConfigError(f"--model {args['model'].model} is loaded as a sequence classifier (--task-type "
                          "seq_cls): the task needs labels (--verbalizer)")
    counts = Counter(t for ex in task.examples("train")
                     for t in tok(ex.source, add_special_tokens=False)["input_ids"])
    try:
        method = build_method(args["prompt"].method, args["prompt"].method_config(args["train"].seed), model, tok,
                              label_texts=fmt.label_texts if fmt.is_classification else None, token_counts=counts)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    print(f"method: {method.name}" + (f" + {type(model).__name__} head ({method.classifier.num_labels} classes)"
                                      if method.classifier is not None else "")
          + f", {method.num_trainable():,} trainable parameters "
          f"(base model {sum(p.numel() for p in model.parameters()):,}, frozen)"
          + (f"; init text {args['prompt'].init_text!r}" if args["prompt"].init == "text" else ""))
    meta = _task_meta(args["data"], fmt)
    train_cfg = {k: dataclasses.asdict(v) for k, v in args.items()}

    def save_best(m, metrics):
        save_prompt(out / "best", m, model, task=meta, train_config=train_cfg, metrics=metrics, overwrite=True)

    result = train(model, tok, method, task, args["train"], save_best=save_best,
                   eval_batch_size=args["eval"].eval_batch_size, max_length=args["data"].max_length)
    from softprompt.train import distributed

    if distributed()[0] != 0:  # data-parallel run: the first process evaluates and saves
        return 0
    print(f"trained {result.steps} steps in {result.seconds:.0f}s"
          + (f"; best validation {result.best_metric:.4f} at step {result.best_step}"
             if result.best_metric is not None else ""))
    if result.rollbacks:
        print(f"divergence guard: {result.rollbacks} rollback(s), lr lowered to x{result.lr_scale:g} of the schedule "
              f"(events in {out / 'metrics.jsonl'})")
    save_prompt(out / "last", method, model, task=meta, train_config=train_cfg, overwrite=True)
    chosen = load_prompt(out / "best", model) if (out / "best").exists() else load_prompt(out / "last", model)
    tuned = chosen.build_method().to(model.device).eval()
    plot_curves(out / "metrics.jsonl", out / "curves.png")
    split = args["eval"].split
    report: dict = {}
    if task.splits.get(split):
        with torch.no_grad():
            kv = inject.compute_prompt_kv(model, tuned())
        report = _baselines(model, tok, task, args, args["prompt"].init_text, task.examples(split), kv)
        print(f"\n{split} split ({len(task.examples(split))} examples):")
        print(format_report(report))
        (out / "eval.json").write_text(json.dumps(report, indent=2))
    save_prompt(out / "prompt", tuned, model, task=meta, train_config=train_cfg,
                metrics={"validation": chosen.meta.get("metrics"), split: report.get("tuned soft prompt")},
                overwrite=True)
    print(f"\nsaved prompt to {out / 'prompt'}  (curves: {out / 'curves.png'}, log: {out / 'metrics.jsonl'})")
    if result.diverged:
        _report_divergence(ns, args, result, out)
        return 1
    if ns.store:
        from softprompt.store import PromptStore

        PromptStore(ns.store, create=not Path(ns.store).exists()).add(ns.task, out / "prompt", overwrite=True)
        print(f"added to store {ns.store} as task {ns.task!r}")
    return 0


def _report_divergence(ns: argparse.Namespace, args: dict, result, out: Path) -> None:
    """Tell on stderr that the divergence guard ended the run, what was kept, and what to try."""
    train_args = args["train"]
    if result.best_step is not None:
        kept = f"the best validation prompt (step {result.best_step})"
    else:  # the guard restored the last good copy before stopping
        kept = f"the last good prompt (step {result.history[-1]['rolled_back_to']})"
    lines = [f"softprompt train: error: the training diverged: the divergence guard stopped it at step {result.steps} "
             f"after {result.rollbacks} rollback(s) (--max-rollbacks {train_args.max_rollbacks}; lr lowered to "
             f"x{result.lr_scale:g} of --lr {train_args.lr:g}); reasons: the \"event\" lines of "
             f"{out / 'metrics.jsonl'}",
             f"  kept: {kept}, evaluated above and saved to {out / 'prompt'}"]
    if ns.store:
        lines.append(f"  not added to --store {ns.store}: add it by hand if its evaluation suits you: "
                     f"softprompt store add --store {ns.store} {ns.task} {out / 'prompt'} --overwrite")
    lines.append(f"  try: a lower --lr (e.g. {train_args.lr / 2:g}), more --warmup-steps, fewer --num-virtual-tokens "
                 f"or a smaller --max-grad-norm; --max-rollbacks {max(1, 2 * train_args.max_rollbacks)} lets "
                 "the guard halve the lr more often")
    print("\n".join(lines), file=sys.stderr)


def cmd_eval(ns: argparse.Namespace) -> int:
    """Evaluate a stored prompt and baselines on a split of its task, or several tasks of a store."""
    import torch

    from softprompt import inject
    from softprompt.evaluate import format_report
    from softprompt.store import check_model_compatible, load_prompt

    problems = ["give either --prompt DIR or --store DIR [--task a,b,...]"] if bool(ns.prompt) == bool(ns.store) else []
    if ns.report:
        problems.append(check_file_to_write("--report", ns.report))
    args = _resolve(ns, ["model", "data", "eval"], [p for p in problems if p])
    stored = load_prompt(ns.prompt) if ns.prompt else None
    model, tok = _load_model(args, stored)
    split = args["eval"].split
    if ns.store:
        report = _eval_store(ns, args, model, tok)
        print(f"{split} split, store {ns.store}:")
    else:
        check_model_compatible(stored, model, check_fingerprint=not ns.no_fingerprint_check)
        task = _load_task(args["data"], stored.task_record,
                          classifier=stored.peft_config.get("task_type") == "SEQ_CLS")
        method = stored.build_method().to(model.device).eval()
        with torch.no_grad():
            kv = inject.compute_prompt_kv(model, method())
        init_text = stored.method_config.get("init_text", "") if stored.method_config.get("init") == "text" else ""
        report = _baselines(model, tok, task, {**args}, init_text, task.examples(split), kv)
        print(f"{split} split ({len(task.examples(split))} examples), prompt {ns.prompt}:")
    print(format_report(report))
    if ns.report:
        Path(ns.report).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.report).write_text(json.dumps(report, indent=2))
    return 0


def _eval_store(ns, args, model, tok) -> dict:
    """Each named store task (default: all) on its own recorded dataset, through one engine."""
    from softprompt.engine import Engine
    from softprompt.evaluate import evaluate_on_engine
    from softprompt.store import PromptStore
    from softprompt.store.task_record import TaskRecord

    store = PromptStore(ns.store)
    names = [t.strip() for t in ns.task.split(",") if t.strip()] if ns.task else store.names()
    ev, data = args["eval"], args["data"]
    engine = Engine(model, tok, max_batch_size=ev.eval_batch_size, max_input_tokens=data.max_length,
                    truncate=True, progress=True)
    report = {}
    for name in names:
        t = engine.load_from_store(store, name, not ns.no_fingerprint_check)
        meta = t.meta or {}  # an ensemble's: its first member's (the members share their labels)
        task_args = dataclasses.replace(data)
        recorded = (meta.get("train_config") or {}).get("data") or {}
        record = TaskRecord.parse(meta.get("task"), name)  # validated when the entry was loaded
        if task_args.dataset is None and not task_args.uses_files() and not (record and record.dataset):
            for key in ("train_file", "validation_file", "test_file"):  # trained on files: use them again
                setattr(task_args, key, recorded.get(key))
        task = _load_task(task_args, record)
        t0 = time.perf_counter()
        report[name] = evaluate_on_engine(engine, {name: name}, task.examples(ev.split), task.format,
                                          ev.max_new_tokens)[name]
        log.info("evaluated %s in %.1fs", name, time.perf_counter() - t0)
    return report


def _engine_for(ns, model, tok, **kwargs):
    """An engine serving what the flags name: ``--prompt DIR``, ``--store DIR --task NAME``, or the base model.

    Returns the engine and the task name to send requests to.
    """
    from softprompt.engine import Engine
    from softprompt.store import PromptStore, load_prompt

    engine = Engine(model, tok, **kwargs)
    check = not ns.no_fingerprint_check
    if getattr(ns, "store", None):
        if not ns.task:
            raise ConfigError("--store needs --task NAME (see `softprompt store list --store DIR`)")
        engine.load_from_store(PromptStore(ns.store), ns.task, check)
        return engine, ns.task
    if getattr(ns, "task", None):
        raise ConfigError("--task needs --store DIR")
    if ns.prompt:
        engine.add_prompt("prompt", load_prompt(ns.prompt, model, check_fingerprint=check))
        return engine, "prompt"
    engine.add_base("base")
    return engine, "base"


def cmd_generate(ns: argparse.Namespace) -> int:
    """Generate with a stored prompt, a store's task, or the plain base model, for one or more inputs."""
    from softprompt.engine import GenerateRequest

    args = _resolve(ns, ["model"], generate_flag_problems(ns.max_new_tokens, ns.temperature, ns.top_k, ns.top_p,
                                                          ns.seed))
    model, tok = _load_model(args)
    engine, task = _engine_for(ns, model, tok)
    reqs = [GenerateRequest(task, text, raw=ns.raw, max_tokens=ns.max_new_tokens, temperature=ns.temperature,
                            top_k=ns.top_k, top_p=ns.top_p, seed=ns.seed + i if ns.temperature > 0 else None,
                            stop=[ns.stop] if ns.stop else [])
            for i, text in enumerate(ns.input)]
    for res in engine.generate(reqs):
        print(json.dumps({"task": task, "input": res.source, "output": res.text, "finish_reason": res.finish_reason},
                         ensure_ascii=False))
    return 0


def _read_token_file(path: str | None) -> str | None:
    """The admin token kept in a file (first line, surrounding whitespace dropped), so no process list shows it."""
    if path is None:
        return None
    try:
        token = Path(path).read_text(encoding="utf-8").strip().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--admin-token-file {path!r}: cannot read it ({e})") from e
    if not token or not token[0].strip():
        raise ConfigError(f"--admin-token-file {path!r} is empty")
    return token[0].strip()


def build_app(args: dict):
    """The server application for resolved ``model`` and ``serve`` sections (used by ``serve`` and tests)."""
    import os

    from softprompt.engine import Engine
    from softprompt.server import Scheduler, ServerState, create_app
    from softprompt.store import PromptStore

    sv = args["serve"]
    token = sv.admin_token or _read_token_file(sv.admin_token_file) or os.environ.get("SOFTPROMPT_ADMIN_TOKEN")
    model, tok = _load_model(args)
    store = PromptStore(sv.store) if sv.store else None
    # serving the whole store, one broken entry is skipped (logged); a broken entry named by --tasks is an error
    engine = (Engine.from_store(store, model, tok, names=sv.tasks or None, skip_broken=not sv.tasks,
                                max_batch_size=sv.max_batch_size)
              if store else Engine(model, tok, max_batch_size=sv.max_batch_size))
    if sv.base_task and not engine.encoder:  # an encoder classifier has nothing to serve without a prompt
        engine.add_base(sv.base_task)
    state = ServerState(engine, Scheduler(engine, sv.max_batch_size, sv.max_wait_ms, sv.max_queue), store=store,
                        admin_token=token, max_tokens=sv.max_tokens, max_body_bytes=sv.max_body_bytes,
                        max_input_chars=sv.max_input_chars)
    log.info("serving %d tasks: %s%s", len(engine.task_names()), ", ".join(engine.task_names()),
             "" if token else " (admin endpoints disabled: no --admin-token / SOFTPROMPT_ADMIN_TOKEN)")
    return create_app(state)


def cmd_serve(ns: argparse.Namespace) -> int:
    """Serve every task of a store (and the base model) over HTTP until interrupted."""
    try:
        import uvicorn
    except ImportError as e:
        raise ConfigError("softprompt serve needs the server extra: pip install -e '.[serve]'") from e
    args = _resolve(ns, ["model", "serve"])
    app = build_app(args)
    uvicorn.run(app, host=args["serve"].host, port=args["serve"].port, log_level="info")
    return 0


def cmd_compare(ns: argparse.Namespace) -> int:
    """Train and evaluate every method with the same loop and budget; print and save the table and charts.

    Returns 1 when a method failed (listed on stderr with its error; without ``--keep-going`` the methods
    after it do not run), 0 when every method ran.
    """
    from softprompt.compare import CompareSettings, context_problems, format_table, run_compare, select_specs

    settings = CompareSettings(ns.model, ns.dataset, ns.steps, ns.batch_size, ns.test_samples, ns.val_samples,
                               ns.eval_every, ns.seeds, not ns.no_lr_search, ns.lr_grid, ns.search_steps,
                               ns.converged_tol, ns.adapter_size)
    specs, problems = select_specs(ns.only, ns.adapter_size)
    problems += settings.problems() + [check_folder_to_create("--output-dir", ns.output_dir)]
    problems = [p for p in problems if p] or context_problems(specs, ns.model)
    if problems:
        raise ConfigError("invalid arguments:\n  " + "\n  ".join(problems))
    out = Path(ns.output_dir)
    search = (f"lr searched over {settings.lr_grid} values ({settings.search_budget} steps each, on validation)"
              if settings.lr_search and settings.lr_grid > 1 else "fixed lr")
    print(f"comparing {len(specs)} methods on {ns.dataset}, {ns.steps} steps of batch {ns.batch_size}, {search}, "
          f"seeds: {ns.seeds}, test on {ns.test_samples} examples")
    rows = run_compare(specs, settings, out, log=lambda line: print(line, flush=True), keep_going=ns.keep_going)
    print("\n" + format_table(rows))
    print(f"saved {out / 'compare.json'}, {out / 'compare.md'}, {out / 'compare.png'}, {out / 'compare_curves.png'}")
    failed = [r for r in rows if "error" in r]
    if not failed:
        return 0
    not_run = [s.label for s in specs[len(rows):]]
    lines = [f"  {r['method']}: {r['error']}" for r in failed]
    if not_run:
        lines.append(f"  not run (the first failure stops the comparison; --keep-going runs them): "
                     f"{', '.join(not_run)}")
    print(f"softprompt compare: error: {len(failed)} of {len(specs)} methods failed:\n" + "\n".join(lines),
          file=sys.stderr)
    return 1


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
    p.add_argument("--input", action="append", required=True,
                   help="input text, filled into the prompt's template (repeatable)")
    p.add_argument("--raw", action="store_true", help="use --input as the whole text, without the template")
    p.add_argument("--config", help="YAML file with a model section")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="seed of the first input's sampler (+1 per input)")
    p.add_argument("--stop", default="\n", help="cut the output at this string ('' to keep all)")
    p.add_argument("--no-fingerprint-check", action="store_true", help="load a prompt saved for another model")
    _add_section(p, "model")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="serve a store's tasks over HTTP (OpenAI-compatible)")
    p.add_argument("--config", help="YAML file with model/serve sections")
    for s in ("model", "serve"):
        _add_section(p, s)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "compare", help="compare prompt methods, LoRA, adapters, BitFit and full fine-tuning",
        description="Train and evaluate every method with the same loop and budget: each method's lr is picked "
                    "by a short search scored on the validation split (never test), then it trains --seeds times; "
                    "print and save the table (compare.md: test accuracy mean ± std, guard rollbacks, "
                    "convergence), every run (compare.json) and charts (compare.png, compare_curves.png).",
        epilog="exit status: 0 when every method ran; 1 when a method failed (each failed method and its error "
               "are listed on stderr; the files hold the rows that ran); 2 for invalid arguments.")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--dataset", default="rotten_tomatoes")
    p.add_argument("--steps", type=int, default=60, help="training steps of every seed run")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--test-samples", type=int, default=400)
    p.add_argument("--val-samples", type=int, default=200,
                   help="validation examples (lr search and curves; held out of train if the data has none)")
    p.add_argument("--eval-every", type=int, default=0, help="steps between validation points (0: steps/6)")
    p.add_argument("--seeds", type=int, default=3, help="runs per method; the table shows mean ± std")
    p.add_argument("--lr-grid", type=int, default=3,
                   help="lr candidates per method, log-spaced by sqrt(10) around its default")
    p.add_argument("--search-steps", type=int, default=0, help="steps of each lr candidate's run (0: steps/2)")
    p.add_argument("--no-lr-search", action="store_true", help="train every method at its default lr")
    p.add_argument("--converged-tol", type=float, default=0.02,
                   help="converged: mean validation loss fell by less than this fraction over the last third")
    p.add_argument("--adapter-size", type=int, default=8, help="bottleneck width of the Houlsby adapters")
    p.add_argument("--only",
                   help="comma-separated kinds: prompt_tuning,prefix_tuning,p_tuning,lora,adapter,bitfit,full")
    p.add_argument("--output-dir", default="runs/compare")
    p.add_argument("--keep-going", action="store_true",
                   help="after a method fails, run the others and write the whole table; the exit status is "
                        "still 1, because the table lacks that method")
    p.set_defaults(func=cmd_compare)

    add_store_parsers(sub)
    add_inspect_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``softprompt`` command; returns the exit status."""
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

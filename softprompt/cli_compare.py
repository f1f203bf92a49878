"""The ``compare`` subcommand: every method trained and scored the same way (:mod:`softprompt.compare`)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from softprompt.config import ConfigError, check_folder_to_create
from softprompt.model import DEFAULT_MODEL


def cmd_compare(ns: argparse.Namespace) -> int:
    """Train and evaluate every method with the same loop and budget; print and save the table and charts.

    Returns 1 when a method failed (listed on stderr with its error; without ``--keep-going`` the methods
    after it do not run), 0 when every method ran.
    """
    from softprompt.compare import (
        CompareSettings,
        context_problems,
        format_failures,
        format_table,
        run_compare,
        select_specs,
        selection_metric,
    )
    from softprompt.data import DataError

    settings = CompareSettings(ns.model, ns.dataset, ns.steps, ns.batch_size, ns.test_samples, ns.val_samples,
                               ns.eval_every, ns.seeds, not ns.no_lr_search, ns.lr_grid, ns.search_steps,
                               ns.converged_tol, ns.adapter_size, not ns.fixed_steps, ns.schedule, ns.metric,
                               ns.lr_extend)
    specs, problems = select_specs(ns.only, ns.adapter_size)
    problems += settings.problems() + [check_folder_to_create("--output-dir", ns.output_dir)]
    note = None
    if not any(problems):  # one metric for every row, resolved on the validation split the runs see (and --resume)
        try:
            metric, note = selection_metric(settings)
            settings = dataclasses.replace(settings, metric=metric)
        except (ConfigError, DataError) as e:
            problems.append(str(e))
    if ns.store:
        from softprompt.compare.ensemble import store_problems

        problem = check_folder_to_create("--store", ns.store)
        problems += [problem] if problem else store_problems(specs, ns.seeds, ns.store)
    if ns.resume:
        from softprompt.compare import resume_problem

        problems += (["--resume and --store cannot be combined: the kept rows' prompts went to the earlier run's "
                      "store"] if ns.store else [resume_problem(Path(ns.output_dir), settings)])
    problems = [p for p in problems if p] or context_problems(specs, ns.model)
    if problems:
        raise ConfigError("invalid arguments:\n  " + "\n  ".join(problems))
    out = Path(ns.output_dir)
    search = (f"lr searched over {settings.lr_grid} values ({settings.search_budget} steps each, on validation"
              + (f"; up to {settings.lr_extend} more beyond an edge that wins)" if settings.lr_extend else ")")
              if settings.lr_search and settings.lr_grid > 1 else "fixed lr")
    budget = (f"{ns.steps} steps" if ns.fixed_steps else f"until converged, at most {ns.steps} steps") + "".join(
        f" ({s.label}: {s.steps_scale} x)" for s in specs if s.steps_scale != 1) + f" ({ns.schedule} lr schedule)"
    print(f"comparing {len(specs)} methods on {ns.dataset}, {budget} of batch {ns.batch_size}, {search}, "
          f"seeds: {ns.seeds}, test on {ns.test_samples} examples; validation {settings.metric} ranks and plots")
    if note:
        print(note)
    if ns.store:
        print(f"each prompt method's {ns.seeds} seed prompts and their mean ensemble go into store {ns.store} "
              "(weight methods have no prompt); the ensembles are scored on the same test examples")
    rows = run_compare(specs, settings, out, log=lambda line: print(line, flush=True), keep_going=ns.keep_going,
                       store=ns.store, resume=ns.resume)
    print("\n" + format_table(rows))
    print(f"saved {out / 'compare.json'}, {out / 'compare.md'}, {out / 'compare.png'}, {out / 'compare_curves.png'}")
    failures = format_failures(rows, specs)
    if failures is None:
        return 0
    print(f"softprompt compare: error: {failures}", file=sys.stderr)
    return 1


def add_compare_parser(sub) -> None:
    """Add ``compare`` to the subcommands ``sub``."""
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
    p.add_argument("--steps", type=int, default=400,
                   help="the most training steps of a seed run (its lr schedule spans them); a run stops earlier "
                        "once its validation loss has flattened (see --converged-tol), unless --fixed-steps")
    p.add_argument("--schedule", default="wsd",
                   help="lr schedule of every run (train's --schedule): wsd (default) holds the lr after warmup until "
                        "the validation loss flattens, then cools down (or decays over the last quarter of --steps "
                        "if it never flattens), so convergence does not depend on --steps; linear decays over --steps")
    p.add_argument("--fixed-steps", action="store_true",
                   help="train every seed run all --steps, even after its validation loss has flattened")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--test-samples", type=int, default=400)
    p.add_argument("--val-samples", type=int, default=200,
                   help="validation examples (lr search and curves; held out of train if the data has none)")
    p.add_argument("--eval-every", type=int, default=10, help="steps between validation points of a seed run")
    p.add_argument("--seeds", type=int, default=3, help="runs per method; the table shows mean ± std")
    p.add_argument("--lr-grid", type=int, default=3,
                   help="lr candidates per method, log-spaced by sqrt(10) around its default")
    p.add_argument("--lr-extend", type=int, default=2,
                   help="while the best lr candidate is the lowest or highest tried, try up to this many more, one "
                        "sqrt(10) step at a time beyond it (0: the grid only); a choice still at an edge is marked "
                        "in the table")
    p.add_argument("--search-steps", type=int, default=0,
                   help="steps of each lr candidate's run (0: the smaller of --steps and 60)")
    p.add_argument("--no-lr-search", action="store_true", help="train every method at its default lr")
    p.add_argument("--metric", default="auto",
                   help="validation metric the lr search ranks by and the curves show (train's --metric): auto "
                        "(default) is macro-F1 where one label dominates the validation split (60%% or more of two "
                        "labels, 40%% of four), else accuracy (exact match for generation), one for every row")
    p.add_argument("--converged-tol", type=float, default=0.02,
                   help="converged: a seed run's validation loss fell by less than this fraction over the last third "
                        "of its steps; once this held at two validation points in a row, from the 6th on, a run cools "
                        "down (its lr falls to 0 over another third of its steps), then stops")
    p.add_argument("--adapter-size", type=int, default=8, help="bottleneck width of the Houlsby adapters")
    p.add_argument("--only",
                   help="comma-separated kinds (prompt_tuning,prefix_tuning,p_tuning,lora,adapter,bitfit,full: "
                        "every row of that kind) or rows by their slug (the label in lower case, other characters as "
                        "'-', e.g. prompt-tuning-text-init-p-5)")
    p.add_argument("--output-dir", default="runs/compare")
    p.add_argument("--store", metavar="DIR",
                   help="add each prompt method's seed prompts to this prompt store as <method-slug>-seed<k>, with "
                        "their mean ensemble <method-slug>; the table gains the ensemble's test accuracy and its "
                        "gain over the mean single prompt (classification; needs --seeds >= 2)")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows of an earlier run in --output-dir's compare.json that ran to the end (it must "
                        "have been written with the same settings) and run only the others")
    p.add_argument("--keep-going", action="store_true",
                   help="after a method fails, run the others and write the whole table; the exit status is "
                        "still 1, because the table lacks that method")
    p.set_defaults(func=cmd_compare)

"""Command line: ``softprompt inspect``, what stored soft prompts look like in the vocabulary's space.

::

    softprompt inspect PROMPT_DIR [--model M] [--top-k 5] [--json]
    softprompt inspect --store DIR [--task a,b] [--model M] [--top-k 5] [--json]

Per prompt: the nearest vocabulary tokens (cosine) of each virtual token and the prompt's norms; with two
or more prompts (store mode), the similarity matrices between them (see :mod:`softprompt.interpret`). A prefix
prompt (keys and values in every layer) has no token-space embeddings: store mode skips it with a note, and a
single ``PROMPT_DIR`` of that kind is refused. Store mode without ``--task`` leaves out a broken entry, or one
that does not fit the model, with a note too.
Errors are raised as :class:`~softprompt.store.StoreError` or :class:`~softprompt.config.ConfigError`
(``softprompt.cli.main`` maps them to status 2).
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from softprompt.cli_store import parse_members

# softprompt.config/model/store import torch: they are imported inside the functions so that building the
# parser stays cheap
if TYPE_CHECKING:
    from softprompt.store import PromptStore

__all__ = ["add_inspect_parser", "cmd_inspect", "select_store_prompts", "skip_prefix_prompts"]


def _check_args(ns: argparse.Namespace) -> None:
    """Every problem with the flags at once, before anything is loaded."""
    from softprompt.config import ConfigError

    problems = []
    if bool(ns.prompt) == bool(ns.store):
        problems.append("give either PROMPT_DIR or --store DIR [--task a,b], not both" if ns.prompt
                        else "give PROMPT_DIR or --store DIR [--task a,b]")
    if ns.task is not None and not ns.store:
        problems.append("--task needs --store DIR")
    if ns.task is not None and not parse_members(ns.task):
        problems.append(f"--task {ns.task!r}: give comma-separated entry names, e.g. --task a,b")
    if ns.top_k < 1:
        problems.append(f"--top-k must be >= 1, got {ns.top_k}")
    if problems:
        raise ConfigError("invalid arguments:\n  " + "\n  ".join(problems))


def select_store_prompts(store: PromptStore, tasks: list[str] | None) -> tuple[list[str], list[str]]:
    """The prompt entries to inspect: ``tasks`` in order (every prompt entry, sorted, when ``None``).

    An ensemble named in ``tasks`` stands for its members; every ensemble met gets a note.

    Args:
        store: the store.
        tasks: entry names, or ``None`` for every entry.

    Returns:
        ``(prompt names in order without repeats, notes on the ensembles met)``.

    Raises:
        StoreError: names missing from the store (all listed), an unreadable ensemble, or no prompt left.
    """
    from softprompt.store import StoreError

    requested = store.names() if tasks is None else list(dict.fromkeys(tasks))
    missing = [t for t in requested if t not in store]
    if missing:
        raise StoreError(f"{store.root}: no entry {', '.join(map(repr, missing))} "
                         f"(entries: {', '.join(store.names()) or 'none'})")
    names, notes = [], []
    for name in requested:
        if store.kind(name) == "ensemble":
            spec = store.ensemble(name)
            if tasks is not None:  # every prompt is inspected anyway when no --task is given
                names += spec.members
            notes.append(f"{name} is an ensemble ({spec.combine} of {', '.join(spec.members)}), not one prompt: "
                         "its members are inspected instead")
        else:
            names.append(name)
    names = list(dict.fromkeys(names))
    if not names:
        raise StoreError(f"{store.root}: no prompts to inspect")
    return names, notes


def skip_prefix_prompts(loaded: dict) -> tuple[dict, list[str]]:
    """``loaded`` (name -> stored prompt) without the prompts of a method that injects keys and values in every
    layer (prefix tuning): they have no token-space embeddings to compare with the vocabulary. Returns the
    prompts kept and a note per prompt left out."""
    from softprompt.methods import METHODS

    kv = {name for name, stored in loaded.items() if getattr(METHODS.get(stored.method), "injects", None) == "kv"}
    notes = [f"{name} is a {loaded[name].method} prompt (keys and values in every layer, not token embeddings): "
             "not inspected" for name in loaded if name in kv]
    return {name: stored for name, stored in loaded.items() if name not in kv}, notes


def cmd_inspect(ns: argparse.Namespace) -> int:
    """Print nearest tokens, norms and (store mode) similarity of stored prompts; ``--json`` for JSON."""
    _check_args(ns)
    from softprompt.embeddings import vocab_embeddings
    from softprompt.forward import task_type_for_stored
    from softprompt.interpret import format_inspect, inspect_report, token_space_embeddings
    from softprompt.model import DEFAULT_MODEL, load_base_model
    from softprompt.store import PromptStore, StoreError, check_model_compatible, load_prompt

    check = not ns.no_fingerprint_check
    if ns.store:
        store = PromptStore(ns.store)
        names, notes = select_store_prompts(store, parse_members(ns.task) if ns.task is not None else None)
    else:
        store, names, notes = None, [ns.prompt], []
    model_name = ns.model or DEFAULT_MODEL
    # read first (bad folders fail before the model loads), then checked against the model; over a whole store
    # an entry that cannot be inspected is left out with a note (as `store list` lists it as broken and `serve`
    # skips it), one named on the command line (PROMPT_DIR, --task) is an error
    named = store is None or ns.task is not None
    loaded = {}
    for name in names:
        try:
            loaded[name] = store.load(name) if store is not None else load_prompt(name)
        except StoreError as e:
            if named:
                raise
            notes.append(f"{name} is broken, not inspected: {e}")
    # a prefix has no token-space rows (even where their width is the hidden size): the store's other prompts
    # are still inspected; a single one is refused, before the model loads
    loaded, skipped = skip_prefix_prompts(loaded)
    if store is None and skipped:
        raise StoreError(f"{skipped[0]}; inspect shows prompts of embeddings (prompt_tuning, p_tuning)")
    if store is not None:
        notes = notes + skipped
        if not loaded:
            raise StoreError(f"{store.root}: no prompts to inspect ({'; '.join(notes)})")
        names = list(loaded)
    # prompts trained with a classification head need the encoder loaded as a sequence classifier
    task_type = task_type_for_stored(loaded[names[0]].peft_config.get("task_type")) if names else "auto"
    model, tokenizer = load_base_model(model_name, "auto", "auto", task_type=task_type)
    # the vocabulary as the model consumes it (the embedding module's output, scaled on Gemma), the space
    # the stored prompts live in: raw weight rows would put Gemma's norm ratios off by sqrt(hidden_size)
    matrix = vocab_embeddings(model)  # (V, H)
    prompts, details = {}, {}
    for name, stored in loaded.items():
        label = f"{name} ({stored.path})" if store is not None else str(stored.path)
        try:
            check_model_compatible(stored, model, check)
            prompts[name] = token_space_embeddings(label, stored.tensors, int(matrix.shape[1]))  # (P, H)
        except (StoreError, ValueError) as e:
            if named:
                raise StoreError(str(e)) from e
            notes.append(f"{name} does not fit the model, not inspected: {e}")
            continue
        details[name] = {"path": str(stored.path), "method": stored.method}
    if not prompts:
        raise StoreError(f"{store.root}: no prompts to inspect ({'; '.join(notes)})")
    report = inspect_report(prompts, matrix, tokenizer, ns.top_k, model_name=model_name, details=details,
                            notes=notes)
    print(json.dumps(report, indent=2, ensure_ascii=False) if ns.json else format_inspect(report))
    return 0


def add_inspect_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``inspect`` subcommand."""
    p = sub.add_parser("inspect", help="nearest vocabulary tokens, norms and similarity of stored prompts")
    p.add_argument("prompt", nargs="?", metavar="PROMPT_DIR", help="a stored prompt folder (ours or PEFT's)")
    p.add_argument("--store", metavar="DIR", help="inspect the prompts of this store instead")
    p.add_argument("--task", help="comma-separated store entries (default: all; an ensemble means its members)")
    p.add_argument("--model", default=None, help="base model: embedded alias, .gguf file, local folder or hub id "
                   "(default: softprompt.model.DEFAULT_MODEL, the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--top-k", type=int, default=5, help="nearest tokens per virtual token (default: 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--no-fingerprint-check", action="store_true", help="inspect a prompt saved for another model")
    p.set_defaults(func=cmd_inspect)

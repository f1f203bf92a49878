"""Command line for a prompt store: ``softprompt store <verb>`` and ``softprompt ensemble``.

Each verb is a plain function taking the parsed :class:`argparse.Namespace` and returning an exit status;
errors are raised as :class:`~softprompt.store.StoreError` (``softprompt.cli.main`` maps them to status 2).
"""

from __future__ import annotations

import argparse
import json
import math
from typing import TYPE_CHECKING, Any

from softprompt.store.entries import COMBINES

if TYPE_CHECKING:
    from softprompt.store import StoreEntry

HEADLINE_METRICS = ("accuracy", "exact_match", "macro_f1", "f1", "loss", "perplexity")
COLUMNS = ("NAME", "KIND", "METHOD", "TOKENS", "LABELS", "METRIC")


def _flat_metrics(metrics: dict) -> list[tuple[str, Any]]:
    """``(dotted key, value)`` pairs: top-level values first, then nested splits (validation last)."""
    top = [(k, v) for k, v in metrics.items() if not isinstance(v, dict)]
    nested = sorted(((k, v) for k, v in metrics.items() if isinstance(v, dict)), key=lambda kv: kv[0] == "validation")
    return top + [(f"{k}.{kk}", vv) for k, v in nested for kk, vv in v.items() if not isinstance(vv, dict)]


def headline_metric(metrics: dict) -> str:
    """The most telling recorded metric as ``"key=value"`` (e.g. ``test.accuracy=0.8123``), or ``"-"``."""
    flat = [(k, v) for k, v in _flat_metrics(metrics or {})
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)]
    for wanted in HEADLINE_METRICS:
        for key, value in flat:
            if key.rsplit(".", 1)[-1].removeprefix("val_") == wanted:
                return f"{key}={value:.4f}"
    return "-"


def _row(e: StoreEntry) -> tuple[str, ...]:
    if e.kind == "ensemble":
        method = f"{e.combine}({','.join(e.members or [])})"
    else:
        method = e.method or "-"
    tokens = "-" if e.num_virtual_tokens is None else str(e.num_virtual_tokens)
    labels = "-" if e.labels is None else ",".join(e.labels)
    return e.name, e.kind, method, tokens, labels, headline_metric(e.metrics)


def format_table(entries: list[StoreEntry]) -> str:
    """An aligned plain-text table of store entries, broken entries' errors listed below it."""
    rows = [COLUMNS, *(_row(e) for e in entries)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines += [f"broken {e.name}: {e.error}" for e in entries if e.kind == "broken"]
    return "\n".join(lines)


def cmd_store_list(ns: argparse.Namespace) -> int:
    """Print the store's entries as a table (or JSON with ``--json``)."""
    from softprompt.store import PromptStore

    store = PromptStore(ns.store)
    entries = store.list()
    if ns.json:
        print(json.dumps([e.to_dict() for e in entries], indent=2, ensure_ascii=False, default=str))
    elif not entries:
        print(f"{store.root}: no entries")
    else:
        print(format_table(entries))
    return 0


def cmd_store_show(ns: argparse.Namespace) -> int:
    """Print one entry's full metadata as JSON."""
    from softprompt.store import PromptStore

    print(json.dumps(PromptStore(ns.store).show(ns.name), indent=2, ensure_ascii=False, default=str))
    return 0


def cmd_store_add(ns: argparse.Namespace) -> int:
    """Copy a prompt folder (ours or PEFT's) into the store, creating the store if missing."""
    from softprompt.store import PromptStore

    store = PromptStore(ns.store, create=True)
    path = store.add(ns.name, ns.src, overwrite=ns.overwrite)
    e = store.entry(ns.name)
    labels = "" if e.labels is None else f", labels {','.join(e.labels)}"
    print(f"added {ns.name} ({e.method}, {e.num_virtual_tokens} virtual tokens{labels}) at {path}")
    return 0


def cmd_store_remove(ns: argparse.Namespace) -> int:
    """Delete an entry (refused while an ensemble lists it)."""
    from softprompt.store import PromptStore

    store = PromptStore(ns.store)
    store.remove(ns.name)
    print(f"removed {ns.name} from {store.root}")
    return 0


def cmd_store_rename(ns: argparse.Namespace) -> int:
    """Rename an entry; ensembles listing it are updated."""
    from softprompt.store import PromptStore

    store = PromptStore(ns.store)
    users = store.ensembles_with(ns.old)
    store.rename(ns.old, ns.new)
    print(f"renamed {ns.old} to {ns.new}" + (f" (updated ensembles: {', '.join(users)})" if users else ""))
    return 0


def cmd_store_export(ns: argparse.Namespace) -> int:
    """Copy a prompt out of the store (``--peft``: as a plain PEFT folder)."""
    from softprompt.store import PromptStore

    dest = PromptStore(ns.store).export(ns.name, ns.dest, peft=ns.peft, overwrite=ns.overwrite)
    print(f"exported {ns.name} to {dest} ({'PEFT' if ns.peft else 'softprompt'} format)")
    return 0


def parse_members(text: str) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]`` (empty items dropped)."""
    return [m.strip() for m in text.split(",") if m.strip()]


def cmd_ensemble(ns: argparse.Namespace) -> int:
    """Add an ensemble entry of stored prompts."""
    from softprompt.store import PromptStore, StoreError

    store = PromptStore(ns.store)
    members = parse_members(ns.members)
    if not members:
        raise StoreError(f"--members {ns.members!r}: give comma-separated entry names, e.g. --members a,b")
    path = store.add_ensemble(ns.name, members, combine=ns.combine, overwrite=ns.overwrite)
    print(f"added ensemble {ns.name} = {ns.combine} of {', '.join(members)} at {path}")
    return 0


def add_store_parsers(sub: argparse._SubParsersAction) -> None:
    """Register the ``store`` (verbs list/show/add/remove/rename/export) and ``ensemble`` subcommands."""
    store = sub.add_parser("store", help="manage a prompt store (a folder of named task prompts)")
    verbs = store.add_subparsers(dest="verb", required=True)

    def verb(name: str, func, help_: str) -> argparse.ArgumentParser:
        p = verbs.add_parser(name, help=help_)
        p.add_argument("--store", required=True, metavar="DIR", help="the store folder")
        p.set_defaults(func=func)
        return p

    p = verb("list", cmd_store_list, "list the entries")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p = verb("show", cmd_store_show, "print an entry's full metadata")
    p.add_argument("name", metavar="NAME")
    p = verb("add", cmd_store_add, "copy a prompt folder (ours or PEFT's) into the store (created if missing)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("src", metavar="SRC", help="prompt folder to copy")
    p.add_argument("--overwrite", action="store_true", help="replace an existing entry NAME")
    p = verb("remove", cmd_store_remove, "delete an entry")
    p.add_argument("name", metavar="NAME")
    p = verb("rename", cmd_store_rename, "rename an entry (ensembles listing it are updated)")
    p.add_argument("old", metavar="OLD")
    p.add_argument("new", metavar="NEW")
    p = verb("export", cmd_store_export, "copy a prompt out of the store")
    p.add_argument("name", metavar="NAME")
    p.add_argument("dest", metavar="DEST", help="folder to create")
    p.add_argument("--peft", action="store_true", help="write a plain PEFT folder (no softprompt.json)")
    p.add_argument("--overwrite", action="store_true", help="replace DEST if it is an empty folder or a stored prompt")

    p = sub.add_parser("ensemble", help="add an ensemble of stored prompts to a store")
    p.add_argument("--store", required=True, metavar="DIR", help="the store folder")
    p.add_argument("--name", required=True, help="entry name of the ensemble")
    p.add_argument("--members", required=True, help="comma-separated prompt entries, e.g. a,b,c")
    p.add_argument("--combine", choices=COMBINES, default="mean",
                   help="mean: average label scores; vote: majority of predictions (default: mean)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing ensemble NAME")
    p.set_defaults(func=cmd_ensemble)

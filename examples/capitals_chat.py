"""Write a chat-format data set (OpenAI ``messages`` records) built from the capitals task.

    python examples/capitals_chat.py data/capitals_chat     # train.jsonl, validation.jsonl, test.jsonl
    softprompt train --train-file data/capitals_chat/train.jsonl \\
        --validation-file data/capitals_chat/validation.jsonl --test-file data/capitals_chat/test.jsonl \\
        --max-steps 100 --output-dir runs/capitals_chat

The countries and capitals come from the ``countryinfo`` wheel through the built-in ``capitals`` task, and
keep its split (no country is in two splits). Each conversation has a system turn and two question/answer
turns about consecutive countries of its split, so the loss covers two assistant turns per record.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from softprompt.data import load_builtin

SYSTEM = "You answer geography questions with the name of the capital city only."


def conversation(first: dict, second: dict) -> dict:
    """One record: a system turn, then a question and its answer about each of two countries."""
    messages = [{"role": "system", "content": SYSTEM}]
    for rec in (first, second):
        messages += [{"role": "user", "content": f"What is the capital of {rec['country']}?"},
                     {"role": "assistant", "content": rec["capital"]}]
    return {"messages": messages}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="folder for train.jsonl, validation.jsonl and test.jsonl")
    ns = ap.parse_args(argv)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, records in load_builtin("capitals").items():
        # every country is asked twice: as the first question of one record and the second of the previous
        rows = [conversation(records[i], records[(i + 1) % len(records)]) for i in range(len(records))]
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (out / f"{split}.jsonl").write_text(text, encoding="utf-8")  # country names are not all ASCII
        print(f"{out / f'{split}.jsonl'}: {len(rows)} conversations")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Write a context of capital-city facts and questions about them, for `softprompt distill`.

    python examples/capitals_context.py data/capitals_context --facts 60
    softprompt distill --context-file data/capitals_context/context.txt \\
        --inputs-file data/capitals_context/inputs.txt --held-out 0.2 --num-virtual-tokens 16 \\
        --max-steps 60 --output-dir runs/capitals_distill

The facts come from the built-in capitals task (countries from the ``countryinfo`` wheel). The context lists
them; each input starts a sentence about one of them ("The capital of Togo is"), so the teacher (the model
reading the context) can complete it from the context, and the distilled prompt has to carry that in 16
virtual tokens instead of the context's hundreds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from softprompt.data import load_builtin


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="folder for context.txt and inputs.txt")
    ap.add_argument("--facts", type=int, default=60, help="how many countries the context lists")
    ns = ap.parse_args(argv)
    records = load_builtin("capitals")["train"][:ns.facts]
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    context = "Capital cities:\n" + "".join(f"The capital of {r['country']} is {r['capital']}.\n" for r in records)
    (out / "context.txt").write_text(context, encoding="utf-8")  # country names are not all ASCII
    (out / "inputs.txt").write_text("".join(f"The capital of {r['country']} is\n" for r in records), encoding="utf-8")
    print(f"{out / 'context.txt'}: {len(records)} facts; {out / 'inputs.txt'}: {len(records)} inputs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

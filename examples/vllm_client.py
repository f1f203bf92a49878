"""Send a softprompt-tuned request to a vLLM server through its prompt_embeds input.

    vllm serve HuggingFaceTB/SmolLM2-135M-Instruct --enable-prompt-embeds      # the prompt's base model
    python examples/vllm_client.py --prompt runs/rotten_tomatoes/prompt --input "A warm, funny film."

The soft prompt's embeddings and the embeddings of the templated input are computed here, with the same
base model; vLLM runs the rest. Needs `pip install openai`.
"""

from __future__ import annotations

import argparse

from openai import OpenAI

from softprompt.export_vllm import encode, prompt_embeds, request_text
from softprompt.model import load_base_model
from softprompt.store import load_prompt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", required=True, help="stored prompt folder (prompt_tuning or p_tuning)")
    ap.add_argument("--input", required=True)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="the base model the prompt was trained on")
    ap.add_argument("--server", default="http://localhost:8000/v1")
    ap.add_argument("--served-model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    ap.add_argument("--max-tokens", type=int, default=8)
    args = ap.parse_args()

    model, tok = load_base_model(args.model, device="cpu")
    stored = load_prompt(args.prompt, model)
    text, bos = request_text(stored, tok, args.input)  # the layout it was trained with (a chat task: a user turn)
    embeds = prompt_embeds(model, tok, stored.build_method(), text, bos=bos)
    client = OpenAI(base_url=args.server, api_key="EMPTY")
    out = client.completions.create(model=args.served_model, prompt="", max_tokens=args.max_tokens, temperature=0,
                                    extra_body={"prompt_embeds": encode(embeds)})
    print(out.choices[0].text)


if __name__ == "__main__":
    main()

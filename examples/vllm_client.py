"""Send a softprompt-tuned request to a vLLM server through its prompt_embeds input.

    python examples/vllm_client.py --serve-command                       # prints: vllm serve FOLDER --enable-...
    vllm serve FOLDER --enable-prompt-embeds                             # the weights the prompt was trained on
    python examples/vllm_client.py --prompt runs/rotten_tomatoes/prompt --input "A warm, funny film."

The soft prompt's embeddings and the embeddings of the templated input are computed here, with the base model
``--model``; vLLM runs the rest, and must run the same weights. For the embedded alias (the default) or a
``.gguf`` file those are the de-quantised safetensors folder softprompt loads (``--serve-command`` prints it),
not the hub checkpoint the GGUF was made from; a hub id or a model folder is served as it is. Needs
``pip install openai``.
"""

from __future__ import annotations

import argparse

from openai import OpenAI

from softprompt.export_vllm import encode, prompt_embeds, request_text, served_weights
from softprompt.model import load_base_model
from softprompt.store import load_prompt


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", help="stored prompt folder (prompt_tuning or p_tuning)")
    ap.add_argument("--input")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="the base model the prompt was trained on")
    ap.add_argument("--serve-command", action="store_true", help="print the vllm serve command for --model and exit")
    ap.add_argument("--server", default="http://localhost:8000/v1")
    ap.add_argument("--served-model", help="the name vLLM serves --model's weights under (default: what "
                                           "--serve-command serves, vLLM's name for it)")
    ap.add_argument("--max-tokens", type=int, default=8)
    args = ap.parse_args(argv)

    weights = served_weights(args.model)
    if args.serve_command:
        print(f"vllm serve {weights} --enable-prompt-embeds")
        return
    if not args.prompt or args.input is None:
        ap.error("--prompt and --input are required (or --serve-command)")
    served = args.served_model or weights
    client = OpenAI(base_url=args.server, api_key="EMPTY")
    names = [m.id for m in client.models.list().data]
    if served not in names:
        ap.error(f"the server at {args.server} serves {names}, not {served!r}: start it with "
                 f"`vllm serve {weights} --enable-prompt-embeds` (the weights --model {args.model} loads here), or "
                 "pass --served-model with the name it serves those weights under")
    model, tok = load_base_model(args.model, device="cpu")
    stored = load_prompt(args.prompt, model)
    text, bos = request_text(stored, tok, args.input)  # the layout it was trained with (a chat task: a user turn)
    embeds = prompt_embeds(model, tok, stored.build_method(), text, bos=bos)
    out = client.completions.create(model=served, prompt="", max_tokens=args.max_tokens, temperature=0,
                                    extra_body={"prompt_embeds": encode(embeds)})
    print(out.choices[0].text)


if __name__ == "__main__":
    main()

"""Write a model folder with random weights at a realistic shape, for benchmarks where real weights cannot go.

Speed does not depend on the weights, so a benchmark at the size of a 1B-class model needs only its shape.
The folder gets a tokenizer copied from ``--tokenizer`` (a model folder or the embedded alias), so that the
benchmarks' data can be tokenised; a vocabulary larger than the tokenizer's (Llama 3's 128,256 rows) keeps
the LM head as expensive as the real model's, and the extra rows are simply never fed.

    python benchmarks/random_model.py --shape llama-1b --out runs/llama-1b-random   # then, on a GPU:
    python benchmarks/train_step.py --model runs/llama-1b-random --device cuda --batch-size 32 --prompt-tokens 100
    python benchmarks/engine.py --model runs/llama-1b-random --device cuda --batch-size 64 --prompt-tokens 100
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

# hidden, layers, heads, kv heads, MLP width, vocabulary, context: the published configs of these models
SHAPES = {
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=8192, vocab_size=128256, max_position_embeddings=8192),  # Llama 3.2 1B
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=49152, max_position_embeddings=512),
}


def tokenizer_from(source: str):
    """The tokenizer of a model folder, or of the embedded default model (``smollm2-135m-instruct``)."""
    if Path(source).is_dir():
        return AutoTokenizer.from_pretrained(source)
    from softprompt.model import load_base_model

    return load_base_model(source, device="cpu")[1]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    ap.add_argument("--tokenizer", default="smollm2-135m-instruct", help="a model folder or the embedded alias")
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    tok = tokenizer_from(args.tokenizer)
    shape = dict(SHAPES[args.shape])
    if shape["vocab_size"] < len(tok):
        raise SystemExit(f"--shape {args.shape} has {shape['vocab_size']} vocabulary rows, fewer than the "
                         f"tokenizer's {len(tok)}")
    cfg = LlamaConfig(**shape, pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
                      dtype=args.dtype)
    torch.manual_seed(args.seed)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(getattr(torch, args.dtype))
    out = Path(args.out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: {args.shape}, {n / 1e6:.0f}M parameters, {args.dtype}, random weights (seed {args.seed})")


if __name__ == "__main__":
    main()

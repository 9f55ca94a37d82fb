"""Write a random-weight Llama of 1B shape with the zoo's tokenizer: speed where memory bandwidth rules.

    python benchmarks/write_1b.py --tokenizer ../shared/zoo/zoo-s --out runs/llama-1b-shape

Hidden 2048, 16 layers, 32 query / 4 KV heads, FFN 5632, the zoo's 8192-token vocabulary, untied
head; ~0.74B parameters, ~1.5 GB in bf16 (the shape of the issue's llama.cpp comparison). Seeded, so every
run writes the same weights; the text it generates is noise, which does not matter for timing.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", type=Path, required=True, help="a zoo checkpoint directory (its tokenizer files)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=16)
    args = ap.parse_args()
    if not (args.tokenizer / "tokenizer.json").exists():
        sys.exit(f"write_1b: {args.tokenizer} holds no tokenizer.json (pass a zoo model directory)")
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"write_1b: {args.out} exists and is not empty")
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=8192, hidden_size=2048, intermediate_size=5632, num_hidden_layers=args.layers,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, rope_theta=10000.0,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(args.seed)
    with torch.device("cpu"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (args.tokenizer / name).exists():
            shutil.copy(args.tokenizer / name, args.out / name)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {params / 1e9:.2f}B parameters, bf16")


if __name__ == "__main__":
    main()

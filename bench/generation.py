"""Throughput of the shared sampler (rlhf_cli/core/generation.py): answer tokens per second by batch size.

    python bench/generation.py [--hidden 256 --layers 4 --prompts 32 --new 32 --dtype bf16]

Builds a randomly initialised Llama of the given shape on the tiny fixture tokenizer (nothing is
downloaded), then samples the same prompts at batch sizes 1, 8 and 32 (left padding, KV cache) and
prints answer tokens per second and the speed-up over batch size 1. A random model rarely emits EOS,
so nearly every row runs to max_new_tokens and the counts are comparable.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from rlhf_cli.core.chat import prompt_text
    from rlhf_cli.core.device import DTYPES
    from rlhf_cli.core.generation import sample_texts
    from rlhf_cli.demo.tiny import build_model, build_tokenizer, prompt_records
    from rlhf_cli.recipe import GenerationSpec

    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = build_tokenizer(Path(tmp) / "tok")
        model_dir = build_model(Path(tmp) / "model", tok_dir, hidden=args.hidden, layers=args.layers)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[args.dtype]).eval()
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    prompts = [prompt_text(tokenizer, r["prompt"]) for r in prompt_records(args.prompts, seed=0)]
    spec = GenerationSpec(max_new_tokens=args.new, temperature=1.0)
    print(f"llama hidden={args.hidden} layers={args.layers} {args.dtype}, {len(prompts)} prompts x {args.new} new tokens, "
          f"{torch.get_num_threads()} threads")
    list(sample_texts(model, tokenizer, prompts[:8], spec, batch_size=8, seed=0))  # warm-up
    base = None
    for batch_size in (1, 8, 32):
        start = time.perf_counter()
        samples = list(sample_texts(model, tokenizer, prompts, spec, batch_size=batch_size, seed=0))
        seconds = time.perf_counter() - start
        rate = sum(s.completion_tokens for s in samples) / seconds
        base = base or rate
        print(f"batch {batch_size:>2}: {rate:8.0f} answer tokens/s  ({rate / base:4.1f}x batch 1)")


if __name__ == "__main__":
    main()

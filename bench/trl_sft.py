"""A plain trl SFTTrainer run, as its documentation writes one: the baseline `rlhf sft` is measured against.

    python bench/trl_sft.py MODEL DATA OUT --steps 30 --batch-size 8 --max-length 256
    python bench/trl_sft.py MODEL DATA OUT --steps 20 --batch-size 8 --max-length 512 --bits 4 --dtype bfloat16

DATA is JSONL that trl reads as is (conversational prompt/completion records here, so the loss is on the
answers, as in rlhf sft). LoRA on all linear layers (--lora-r / --lora-alpha / --lora-dropout); --bits 4
loads the base through bitsandbytes (NF4, double quantization, bf16 compute), the QLoRA recipe of the trl and
peft docs; --dtype bfloat16 loads the weights trl does not quantize in bf16 (trl loads float32 unless told,
and autocasts to bf16). Everything else is trl's default (bf16 autocast, gradient checkpointing, padded
batches unless --padding-free). Prints one JSON line: real (non-padding) tokens, train_runtime, tokens/s,
tokens per CPU second, steps, the weights' dtype, whether checkpointing ran, and peak memory (the CUDA
allocator's peak on a GPU, as rlhf's run.json records it; peak RSS on a CPU).
"""

from __future__ import annotations

import argparse
import json
import time

# bench/ppo_table.py (this script's folder is on sys.path)
from ppo_table import peak_memory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="model folder")
    ap.add_argument("data", help="JSONL training data")
    ap.add_argument("out", help="trl's output_dir (nothing is saved there but its logs)")
    ap.add_argument("--steps", type=int, required=True, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, default=8, help="samples per optimizer step")
    ap.add_argument("--max-length", type=int, default=256, help="truncate samples to this many tokens")
    ap.add_argument("--lr", type=float, default=2e-4, help="learning rate")
    ap.add_argument("--lora-r", type=int, default=16, help="LoRA rank")
    ap.add_argument("--lora-alpha", type=float, default=32, help="LoRA alpha")
    ap.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout")
    ap.add_argument("--bits", type=int, choices=[4], help="4: QLoRA on a 4-bit NF4 base")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="dtype of the weights trl loads (its default, float32, under bf16 autocast)")
    ap.add_argument("--padding-free", action="store_true",
                    help="trl's padding_free batches (it cannot truncate then: every sample must fit --max-length)")
    args = ap.parse_args()

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in open(args.data, encoding="utf-8") if line.strip()]
    quant = None if args.bits is None else BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    config = SFTConfig(
        # trl refuses max_length with padding_free and no packing.
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        max_length=None if args.padding_free else args.max_length, learning_rate=args.lr,
        logging_steps=5, save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
        include_num_input_tokens_seen="non_padding", padding_free=args.padding_free, seed=42,
        model_init_kwargs={"dtype": args.dtype},
    )
    trainer = SFTTrainer(
        model=args.model, args=config, train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(args.model), quantization_config=quant,
        peft_config=LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                               target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    cpu0 = time.process_time()
    result = trainer.train()
    cpu_s = time.process_time() - cpu0
    runtime = result.metrics["train_runtime"]
    tokens = trainer.state.num_input_tokens_seen
    print(json.dumps({"tokens": tokens, "runtime_s": runtime, "tokens_per_s": tokens / runtime,
                      "tokens_per_cpu_s": tokens / cpu_s, "steps": trainer.state.global_step,
                      "train_loss": result.metrics.get("train_loss"),
                      "weights": str(next(trainer.model.parameters()).dtype).removeprefix("torch."),
                      "checkpointing": bool(config.gradient_checkpointing), "peak_memory": peak_memory()}))


if __name__ == "__main__":
    main()

"""A plain trl DPOTrainer run, as its documentation writes one: the baseline `rlhf dpo` is measured against.

    python bench/trl_dpo.py MODEL DATA OUT --steps 10 --batch-size 8 --max-length 256

DATA is JSONL in trl's conversational preference format ({"prompt": [user message], "chosen": [assistant
message], "rejected": [assistant message]}), which trl renders with the tokenizer's chat template. LoRA on all
linear layers through peft_config (trl wraps the model in a PeftModel and keeps the starting adapter as the
reference). Everything else is DPOConfig's default: beta 0.1, sigmoid loss, learning rate 1e-6, fp32
weights under bf16 autocast, gradient checkpointing, right-padded batches, the reference pass every step.
Prints one JSON line: real (non-padding) tokens, train_runtime, tokens/s, tokens per CPU second, steps,
the weights' dtype, whether checkpointing ran, and peak memory (the CUDA allocator's peak on a GPU, peak
RSS on a CPU).
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
    ap.add_argument("data", help="JSONL preference pairs")
    ap.add_argument("out", help="trl's output_dir (nothing is saved there but its logs)")
    ap.add_argument("--steps", type=int, required=True, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step")
    ap.add_argument("--max-length", type=int, default=256, help="truncate prompt+answer to this many tokens")
    ap.add_argument("--lora-r", type=int, default=16, help="LoRA rank")
    ap.add_argument("--lora-alpha", type=float, default=32, help="LoRA alpha")
    ap.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout")
    args = ap.parse_args()

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in open(args.data, encoding="utf-8") if line.strip()]
    config = DPOConfig(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        max_length=args.max_length, logging_steps=5, save_strategy="no", report_to="none", disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(), include_num_input_tokens_seen="non_padding", seed=42,
    )
    trainer = DPOTrainer(
        model=args.model, args=config, train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(args.model),
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

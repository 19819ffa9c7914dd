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

# bench/throughput.py (this script's folder is on sys.path)
from throughput import add_lora_flags, lora_config, read_jsonl, train_and_report, trl_parser


def main() -> None:
    ap = trl_parser(__doc__, data="JSONL preference pairs", unit="pairs", truncated="prompt+answer")
    add_lora_flags(ap)
    args = ap.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = read_jsonl(args.data)
    config = DPOConfig(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        max_length=args.max_length, logging_steps=5, save_strategy="no", report_to="none", disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(), include_num_input_tokens_seen="non_padding", seed=42,
    )
    trainer = DPOTrainer(
        model=args.model, args=config, train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(args.model),
        peft_config=lora_config(args),
    )
    train_and_report(trainer, config)


if __name__ == "__main__":
    main()

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

# bench/throughput.py (this script's folder is on sys.path)
from throughput import add_lora_flags, lora_config, read_jsonl, train_and_report, trl_parser


def main() -> None:
    ap = trl_parser(__doc__, data="JSONL training data", unit="samples", truncated="samples")
    ap.add_argument("--lr", type=float, default=2e-4, help="learning rate")
    add_lora_flags(ap)
    ap.add_argument("--bits", type=int, choices=[4], help="4: QLoRA on a 4-bit NF4 base")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="dtype of the weights trl loads (its default, float32, under bf16 autocast)")
    ap.add_argument("--padding-free", action="store_true",
                    help="trl's padding_free batches (it cannot truncate then: every sample must fit --max-length)")
    args = ap.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    rows = read_jsonl(args.data)
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
        peft_config=lora_config(args),
    )
    train_and_report(trainer, config)


if __name__ == "__main__":
    main()

"""The Python half of bench/gpu_check.sh: build a random ~1B Llama with its data and recipes, then print
the figures of the runs the shell script made.

    python bench/gpu_check.py prepare WORK [--small]   # model/, tokenizer/, chat.jsonl, prompts.jsonl, *.yaml
    python bench/gpu_check.py report WORK              # tokens/s and peak memory from WORK/sft, WORK/ppo run.json

The model is Llama-shaped (hidden 2048, 16 layers, 32 heads, MLP 5632, vocabulary 32000: ~1.0B
parameters), randomly initialised and saved in bf16; the tokenizer is the tiny fixture BPE
(rlhf_cli.demo.tiny), whose ids all fall inside the larger vocabulary, so the logits cost what a real
32k-vocabulary model's do. --small builds a 2-layer, hidden-64 model instead, to check the script on a CPU.
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from rlhf_cli.demo import tiny

FULL = {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 32,
        "intermediate_size": 5632, "vocab_size": 32000, "max_position_embeddings": 2048}
SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 128, "vocab_size": 1024, "max_position_embeddings": 1024}


def says_great(prompts: list, responses: list[str]) -> list[float]:
    """Rule-based reward for the PPO iteration: 1 when the answer contains "great"."""
    return [1.0 if "great" in r else 0.0 for r in responses]


def chats(n: int, seed: int, sentences: tuple[int, int]) -> list[dict]:
    """Question + a long answer of fixture sentences: a few hundred tokens per sample, like real SFT data."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        question, animal, place = tiny._question(rng)
        answer = " ".join([tiny._answer(animal, place, rng.choice(tiny.GOOD))] +
                          [tiny._sentence(rng) for _ in range(rng.randint(*sentences))])
        out.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return out


def build_model(work: Path, shape: dict) -> int:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(work / "tokenizer")
    config = LlamaConfig(**shape, tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, dtype="bfloat16")
    torch.manual_seed(0)
    # Initialised on the GPU when there is one: a billion parameters initialise in seconds there.
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(work / "model", safe_serialization=True)
    tok.save_pretrained(work / "model")
    return sum(p.numel() for p in model.parameters())


def prepare(work: Path, small: bool) -> None:
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    tiny.build_tokenizer(work / "tokenizer")
    params = build_model(work, SMALL if small else FULL)
    tiny.write_jsonl(work / "chat.jsonl", chats(64 if small else 400, 1, (2, 4) if small else (20, 40)))
    tiny.write_jsonl(work / "prompts.jsonl", tiny.prompt_records(64, 2))
    max_length, steps, batch = (128, 4, 4) if small else (512, 20, 8)
    sft = f"""\
stage: sft
model: {{path: {work / 'model'}, dtype: auto}}
quant: {{bits: 4, quant_type: nf4, double_quant: true}}
lora: {{r: 16, alpha: 32, dropout: 0.05, target_modules: all-linear}}
data: {{train: {work / 'chat.jsonl'}, eval: null, eval_fraction: 0.0, max_length: {max_length}}}
train: {{max_steps: {steps}, batch_size: {batch}, lr: 2.0e-4, warmup_ratio: 0.0, logging_steps: 5, save_steps: 1000,
        gradient_checkpointing: auto}}
output_dir: {work / 'sft'}
"""
    ppo = f"""\
stage: ppo
policy: {{path: {work / 'sft'}, dtype: auto}}
reward: {{function: "bench.gpu_check:says_great"}}
quant: {{bits: 4}}
lora: {{r: 16, alpha: 32, dropout: 0.0, target_modules: all-linear}}
data: {{train: {work / 'prompts.jsonl'}, max_prompt_length: 64}}
generation: {{max_new_tokens: {16 if small else 128}, temperature: 1.0, top_p: 1.0}}
ppo: {{iterations: 1, rollout_batch_size: {8 if small else 32}, mini_batch_size: {4 if small else 8}, ppo_epochs: 2,
      lr: 1.0e-5, save_steps: 1000}}
output_dir: {work / 'ppo'}
"""
    (work / "sft.yaml").write_text(sft)
    (work / "ppo.yaml").write_text(ppo)
    print(f"model: {params / 1e9:.3f} B parameters ({'small' if small else 'full'} shape), "
          f"built and saved in {time.perf_counter() - t0:.1f} s")


def report(work: Path) -> None:
    sft = json.loads((work / "sft" / "run.json").read_text())
    ppo = json.loads((work / "ppo" / "run.json").read_text())
    rows = [json.loads(line) for line in (work / "ppo" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    m = sft["metrics"]
    print(f"QLoRA SFT: {m['steps']} steps, {m['train_tokens_per_s']:.0f} tokens/s, peak memory {sft['peak_memory_gb']:.2f} GiB, "
          f"train_loss {m['train_loss']:.3f}, precision {sft['precision']['compute']}, "
          f"gradient checkpointing {sft['gradient_checkpointing']}, trainable {sft['trainable_params']:,} of {sft['total_params']:,}")
    last = rows[-1]
    print(f"PPO iteration: generation {last['time_generation']:.1f} s ({last['tokens_per_s_generation']:.0f} tokens/s), "
          f"scoring {last['time_scoring']:.1f} s, training {last['time_training']:.1f} s "
          f"({last['tokens_per_s_training']:.0f} tokens/s), peak memory {ppo['metrics']['peak_memory_gb']:.2f} GiB, "
          f"score {last['score_mean']:.3f}, kl {last['kl']:.4f}, layout {ppo['layout']['name']} "
          f"({ppo['layout']['quantized_bits']}-bit base)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("prepare", "report"))
    parser.add_argument("work", type=Path)
    parser.add_argument("--small", action="store_true", help="2-layer model: check the script on a CPU")
    args = parser.parse_args()
    prepare(args.work, args.small) if args.what == "prepare" else report(args.work)


if __name__ == "__main__":
    sys.exit(main())

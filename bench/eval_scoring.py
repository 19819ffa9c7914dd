"""Scoring preference pairs: train-rm's own evaluation against `rlhf eval --metric rm_accuracy`, same pairs.

    python bench/eval_scoring.py [--pairs 400 --hidden 576 --layers 8 --max-length 256 --batch-size 8]

Builds a randomly initialised Llama reward model on the tiny fixture tokenizer (nothing is downloaded;
scores of a random model are as costly as a trained one's) and pairs of mixed length: the fixture's
preference pairs, most of them behind a preamble of 0 to 60 sentences, so lengths spread from ~20
tokens to past max_length as in real preference data. Then it times, one after the other in one process:
  - train-rm's evaluation: Trainer.evaluate with the RewardTrainer (its evaluation_loop);
  - eval's scorer: RewardModel on the same answers (2 x batch_size rows per pass),
and prints seconds, answers per second and both accuracies: both go through core.reward.score_rows, so
they must agree, and cost the same.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path


def pairs(n: int, seed: int) -> list[dict]:
    from rlhf_cli.demo import tiny

    rng = random.Random(seed)
    rows = tiny.preference_records(n, seed)
    for row in rows:
        preamble = " ".join(tiny._sentence(rng) for _ in range(rng.choice([0, 0, 2, 8, 20, 60])))
        row["prompt"] = f"{preamble} {row['prompt']}".strip()
        if rng.random() < 0.3:  # some pairs the wrong way round, so accuracy is not trivially 1
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--hidden", type=int, default=576, help="width (SmolLM2-135M's is 576)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per pass (train-rm's train.batch_size)")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_cli.core import trainer as fitting
    from rlhf_cli.core.chat import ensure_chat_template
    from rlhf_cli.core.comparisons import RankCollator, comparison_samples
    from rlhf_cli.core.device import plan_precision, resolve_dtype
    from rlhf_cli.core.reward import RewardModel
    from rlhf_cli.demo.tiny import build_model, build_tokenizer
    from rlhf_cli.recipe import TrainSpec
    from rlhf_cli.stages.eval import _pair_gaps

    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = build_tokenizer(Path(tmp) / "tok")
        model_dir = build_model(Path(tmp) / "model", tok_dir, hidden=args.hidden, layers=args.layers)
        tok = AutoTokenizer.from_pretrained(tok_dir)
        ensure_chat_template(tok)
        dtype = resolve_dtype("auto")
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=dtype).eval()
        model.config.pad_token_id = tok.pad_token_id
        records = pairs(args.pairs, seed=0)
        samples, stats, lengths = comparison_samples(tok, records, "preference", args.max_length)
        precision = plan_precision("auto", adapters=False, quantized=False)
        train_args = fitting.training_args(TrainSpec(batch_size=args.batch_size, max_steps=1), Path(tmp) / "ckpt",
                                           precision=precision, has_eval=True)
        trainer = fitting.RewardTrainer(model=model, args=train_args, eval_dataset=samples,
                                        data_collator=RankCollator(tok.pad_token_id))
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        for cb in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(cb)

        print(f"reward model: llama hidden {args.hidden}, {args.layers} layers, {str(dtype).removeprefix('torch.')}, "
              f"{torch.get_num_threads()} threads; {len(samples)} pairs, answer tokens p50/p100 "
              f"{sorted(lengths)[len(lengths) // 2]}/{max(lengths)} (max_length {args.max_length}, {stats.truncated} cut)")
        trainer.evaluate()  # warm-up
        t0 = time.perf_counter()
        trained = trainer.evaluate()
        t_train = time.perf_counter() - t0
        scorer = RewardModel(model, tok, max_length=args.max_length, batch_size=2 * args.batch_size)
        _pair_gaps(scorer, records[:16], "warm-up")
        t0 = time.perf_counter()
        gaps, _ = _pair_gaps(scorer, records, "bench")
        t_eval = time.perf_counter() - t0
    answers = 2 * len(samples)
    accuracy = sum(g > 0 for g in gaps) / len(gaps)
    print(json.dumps({
        "train_rm_evaluation_s": round(t_train, 2), "eval_scorer_s": round(t_eval, 2),
        "ratio_eval_to_train": round(t_eval / t_train, 3),
        "answers_per_s": {"train-rm": round(answers / t_train, 1), "eval": round(answers / t_eval, 1)},
        "accuracy": {"train-rm": round(trained["eval_accuracy"], 4), "eval": round(accuracy, 4)},
    }, indent=2))


if __name__ == "__main__":
    main()

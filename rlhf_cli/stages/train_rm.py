"""rlhf train-rm: a Bradley-Terry reward model on preference pairs or K-way rankings.

    rlhf train-rm recipes/tiny/train-rm.yaml
    rlhf train-rm --model runs/sft --data prefs.jsonl

The model is the base (or the policy run) with a one-scalar score head; every answer is rendered with
the chat template exactly as core.reward.RewardModel scores text later, and trained on
-log sigmoid(r_better - r_worse) over every pair of a prompt's ranking, the K answers of one prompt
scored in one pass and counted as one sample (Ouyang et al. 2022; a preference pair is the ranking of
two). Eval logs pairwise accuracy (better answer scored higher) and the mean margin. The
run directory is a reward model for `rlhf ppo --reward` and `rlhf eval --reward`: base, adapter, head and
chat template are found through its run.json.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rlhf_cli.recipe import RewardRecipe
from rlhf_cli.result import RunOptions, RunResult

log = logging.getLogger("rlhf")


def run(recipe: RewardRecipe, options: RunOptions) -> RunResult:
    from rlhf_cli.core import artifacts, chat, comparisons, loading, lora
    from rlhf_cli.core import trainer as fitting
    from rlhf_cli.core.data import percentiles, read_splits
    from rlhf_cli.core.plan import plan_training

    # 1. Tokenizer and data: every data problem surfaces here, before anything is written.
    resolved = loading.resolve(recipe.model, head="reward")
    tokenizer = loading.load_tokenizer(resolved, chat_template=recipe.data.chat_template)
    chat.ensure_chat_template(tokenizer)
    train_records, eval_records, fmt = read_splits(recipe.data, ("preference", "ranked"), recipe.train.seed)
    d = recipe.data
    train_set, stats, lengths = comparisons.comparison_samples(tokenizer, train_records, fmt, d.max_length, d.train)
    eval_set, _, _ = comparisons.comparison_samples(tokenizer, eval_records, fmt, d.max_length, d.eval or d.train)
    if not train_set:
        raise _no_pairs(recipe, stats)
    if stats.truncated:
        log.warning("%d of %d ranked prompts have answers longer than data.max_length %d: their prompts are cut from the left "
                    "(%d left no pair that differs and are skipped)", stats.truncated, len(train_records) - stats.unranked, d.max_length,
                    stats.cut_equal)

    # 2. How the model will be held: dtype, trainable parameters, parent adapters, memory.
    longest = min(d.max_length, max(lengths))
    per_prompt = max(len(s["response_ids"]) for s in train_set)
    plan = plan_training(resolved, recipe.model, lora=recipe.lora, quant=recipe.quant, train=recipe.train,
                         head="reward", tokens_per_step=per_prompt * recipe.train.batch_size * longest)
    first = train_set[0]
    better, worse = first["pairs"][0]
    details = {
        "format": fmt,
        "train": {**stats.summary(), "length_percentiles": percentiles(lengths)},
        "eval_prompts": len(eval_set),
        "max_length": d.max_length,
        **plan.as_json(),
        "sample_chosen": tokenizer.decode(first["response_ids"][better]),
        "sample_rejected": tokenizer.decode(first["response_ids"][worse]),
    }
    # Built before anything is written: settings the machine cannot run (fp16 on a CPU) fail here.
    args = fitting.training_args(recipe.train, Path(recipe.output_dir) / "checkpoints", precision=plan.precision,
                                 has_eval=bool(eval_set), gradient_checkpointing=plan.checkpointing,
                                 count_tokens="non_padding")
    if options.dry_run:
        return RunResult(stage="train-rm", status="dry-run", output_dir=None, details=details)

    # 3. Claim the run directory, load, train.
    kept = plan.parent_adapters == "kept"
    run_dir = fitting.claim_run(recipe, "train-rm", options, resolved, kept=kept,
                                 records=(train_records, eval_records))
    with fitting.failure_marked(run_dir):
        quantized = recipe.quant.bits is not None
        # The score head is new: drawn from train.seed, so the same recipe gives the same run in any process.
        model = loading.load_model(resolved, dtype=plan.precision.load, quant=recipe.quant, head="reward",
                                  merge_parent=not kept, seed=recipe.train.seed)
        # Saved with a full model, for tools that pool with transformers' own rule (rightmost non-pad
        # token); rlhf itself pools by the attention mask (core.reward.sequence_scores).
        model.config.pad_token_id = tokenizer.pad_token_id
        model = lora.make_trainable(model, lora=recipe.lora, task="SEQ_CLS", quantized=quantized,
                                      checkpointing=plan.checkpointing, seed=recipe.train.seed,
                                      parent_adapter=resolved.adapters[0] if kept else None)
        held = fitting.model_fields(model, plan, recipe.quant, stats.summary())
        run_dir.update(format=fmt, **held, chat_template=tokenizer.chat_template,
                       gradient_checkpointing=plan.checkpointing)
        trainer = fitting.RewardTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set or None,
                                        data_collator=comparisons.RankCollator(tokenizer.pad_token_id),
                                        center_rewards_coef=recipe.center_rewards_coef)
        outcome = fitting.fit(trainer, run_dir, "train-rm")
        eval_metrics = fitting.evaluate(trainer, outcome) if eval_set else {}

        section = artifacts.save_outputs(run_dir.path, model, tokenizer, reward=True,
                                         state_dict=fitting.full_state_dict(trainer))
        metrics = fitting.run_metrics(outcome, eval_metrics)
        fitting.complete(run_dir, outcome, metrics, section)
    return RunResult(stage="train-rm", status="completed", output_dir=str(run_dir.path), metrics=metrics,
                     details={"trainable_params": held["trainable_params"], "truncated": stats.truncated,
                              "dtype": plan.precision.as_json()["compute"]})


def _no_pairs(recipe: RewardRecipe, stats: Any) -> Exception:
    from rlhf_cli.errors import DataError

    where = recipe.data.train
    if stats.unranked and not stats.no_signal:
        return DataError(f"{where}: no row is ranked yet ({stats.unranked} rows): fill in their ranking or scores")
    if stats.cut_equal:
        return DataError(f"{where}: no pair differs within data.max_length {recipe.data.max_length}: raise data.max_length")
    return DataError(f"{where}: every pair compares two identical answers (or ties): nothing to learn from")

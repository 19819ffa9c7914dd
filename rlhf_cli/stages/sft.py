"""rlhf sft: supervised fine-tuning on demonstrations (messages or prompt/completion).

    rlhf sft recipes/tiny/sft.yaml
    rlhf sft --model runs/pretrain --data chat.jsonl --set lora.r=16 --dry-run

Conversations are rendered with the tokenizer's chat template (or data.chat_template) and the loss covers
assistant tokens only by default. Batches are padding-free: each batch is one row of concatenated
samples with per-sample position_ids (core.batches.FlatCollator), so no FLOPs go to padding. Writes
adapter/ (or model/), tokenizer/ with the exact chat template, metrics.jsonl and run.json.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rlhf_cli.recipe import SFTRecipe
from rlhf_cli.result import RunOptions, RunResult

log = logging.getLogger("rlhf")


def run(recipe: SFTRecipe, options: RunOptions) -> RunResult:
    from rlhf_cli.core import artifacts, attention, batches, chat, loading, lora
    from rlhf_cli.core import trainer as fitting
    from rlhf_cli.core.data import read_splits
    from rlhf_cli.core.plan import plan_training

    # 1. Tokenizer and data: every data problem surfaces here, before anything is written.
    resolved = loading.resolve(recipe.model)
    tokenizer = loading.load_tokenizer(resolved, chat_template=recipe.data.chat_template)
    chat.ensure_chat_template(tokenizer)
    train_records, eval_records, fmt = read_splits(recipe.data, ("messages", "prompt_completion"), recipe.train.seed)
    d = recipe.data
    train_set, stats = batches.chat_samples(tokenizer, train_records, fmt, d.max_length, d.completion_only_loss)
    eval_set, _ = batches.chat_samples(tokenizer, eval_records, fmt, d.max_length, d.completion_only_loss)
    if not train_set:
        raise _no_samples(recipe, train_records, fmt)
    longest = min(d.max_length, max(stats.lengths))
    # A padded batch is batch_size rows of its longest sample; a padding-free one is its samples' tokens, at
    # most those of the batch_size longest samples.
    cut = sorted(min(d.max_length, n) for n in stats.lengths)
    tokens_per_step = sum(cut[-recipe.train.batch_size:]) if d.padding_free else recipe.train.batch_size * longest
    # The loss takes logits only where labels are (core.trainer.causal_lm_loss): at most the batch_size most.
    labelled = sorted(sum(1 for t in s["labels"] if t != -100) for s in train_set)
    logit_tokens = sum(labelled[-recipe.train.batch_size:])

    # 2. How the model will be held: dtype, trainable parameters, parent adapters, memory.
    plan = plan_training(resolved, recipe.model, lora=recipe.lora, quant=recipe.quant, train=recipe.train,
                         head="causal", tokens_per_step=tokens_per_step, logit_tokens=logit_tokens)
    details = {
        "format": fmt,
        "train": stats.summary(),
        "eval_samples": len(eval_set),
        "max_length": d.max_length,
        "padding_free": d.padding_free,
        **plan.as_json(),
        "sample": batches.show_loss_mask(tokenizer, train_set[0]["input_ids"], train_set[0]["labels"]),
    }
    _warn_truncation(stats.truncated, stats.dropped, len(train_records), d.max_length)
    # Built before anything is written: settings the machine cannot run (fp16 on a CPU) fail here.
    # tokens_seen and tokens/s count the samples' tokens: a padded batch's pad positions are no training tokens.
    args = fitting.training_args(recipe.train, Path(recipe.output_dir) / "checkpoints", precision=plan.precision,
                                 has_eval=bool(eval_set), gradient_checkpointing=plan.checkpointing,
                                 count_tokens="all" if d.padding_free else "non_padding")
    if options.dry_run:
        return RunResult(stage="sft", status="dry-run", output_dir=None, details=details)

    # 3. Claim the run directory, load, train.
    kept = plan.parent_adapters == "kept"
    run_dir = fitting.claim_run(recipe, "sft", options, resolved, kept=kept,
                                 records=(train_records, eval_records))
    with fitting.failure_marked(run_dir):
        quantized = recipe.quant.bits is not None
        model = loading.load_model(resolved, dtype=plan.precision.load, quant=recipe.quant,
                                  merge_parent=not kept)
        kernel = attention.use_packed_attention(model) if d.padding_free else None
        model = lora.make_trainable(model, lora=recipe.lora, task="CAUSAL_LM", quantized=quantized,
                                      checkpointing=plan.checkpointing, seed=recipe.train.seed,
                                      parent_adapter=resolved.adapters[0] if kept else None)
        held = fitting.model_fields(model, plan, recipe.quant, stats.summary())
        run_dir.update(format=fmt, **held, chat_template=tokenizer.chat_template,
                       attention=kernel or model.config._attn_implementation, gradient_checkpointing=plan.checkpointing)
        collator = batches.FlatCollator() if d.padding_free else batches.PadCollator(tokenizer.pad_token_id)
        trainer = fitting.CausalTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set or None,
                                        data_collator=collator)
        outcome = fitting.fit(trainer, run_dir, "sft", perplexity=True)
        eval_metrics = fitting.evaluate(trainer, outcome, perplexity=True) if eval_set else {}

        section = artifacts.save_outputs(run_dir.path, model, tokenizer, state_dict=fitting.full_state_dict(trainer))
        metrics = fitting.run_metrics(outcome, eval_metrics)
        fitting.complete(run_dir, outcome, metrics, section)
    details = {"trainable_params": held["trainable_params"], "truncated": stats.truncated, "dtype": plan.precision.as_json()["compute"]}
    return RunResult(stage="sft", status="completed", output_dir=str(run_dir.path), metrics=metrics, details=details)


def _no_samples(recipe: SFTRecipe, records: list[dict[str, Any]], fmt: str) -> Exception:
    from rlhf_cli.core.chat import record_messages
    from rlhf_cli.errors import DataError

    if not any(m["role"] == "assistant" for r in records for m in record_messages(r, fmt)):
        # Nothing to learn whatever the length: SFT trains on the assistant's turns only.
        return DataError(
            f"{recipe.data.train}: no record has an assistant turn (role: assistant), the answer SFT learns; "
            "add one to each conversation, or train on raw text with rlhf pretrain"
        )
    return DataError(
        f"{recipe.data.train}: no sample has an answer token left within data.max_length {recipe.data.max_length}: "
        "raise data.max_length"
    )


def _warn_truncation(truncated: int, dropped: int, n: int, max_length: int) -> None:
    if truncated:
        log.warning("%d of %d samples are longer than data.max_length %d and are cut", truncated, n, max_length)
    if dropped:
        log.warning("%d of %d samples have no answer token to learn (no assistant turn, or its tokens cut at "
                    "data.max_length %d) and are skipped", dropped, n, max_length)

"""rlhf dpo: Direct Preference Optimization on preference pairs (Rafailov et al. 2023).

    rlhf dpo recipes/tiny/dpo.yaml
    rlhf dpo --model runs/sft --data prefs.jsonl --set dpo.beta=0.1 --dry-run

The policy learns from pairs directly: loss -log sigmoid(beta * (log-ratio chosen - log-ratio rejected)),
each log-ratio taken against a frozen reference, which is the starting policy (an sft run with its
adapter), never the raw base (see core.dpo for how each setup keeps it). beta * log-ratio is the
policy's implicit reward; eval_accuracy is how often it ranks the held-out chosen answer higher.
Pairs are rendered with the chat template as train-rm renders them. Writes adapter/ (or model/) and
tokenizer/ like sft, so generate, eval, merge and another stage take the run as a model.
"""

from __future__ import annotations

import logging
from pathlib import Path

from rlhf_cli.recipe import DPORecipe
from rlhf_cli.result import RunOptions, RunResult

log = logging.getLogger("rlhf")


def run(recipe: DPORecipe, options: RunOptions) -> RunResult:
    from rlhf_cli.core import artifacts, attention, chat, loading, lora
    from rlhf_cli.core import dpo as dpo_trl
    from rlhf_cli.core import trainer as fitting
    from rlhf_cli.core.data import read_splits
    from rlhf_cli.core.plan import plan_training

    # 1. Tokenizer and data: every data problem surfaces here, before anything is written.
    resolved = loading.resolve(recipe.model)
    tokenizer = loading.load_tokenizer(resolved, chat_template=recipe.data.chat_template)
    chat.ensure_chat_template(tokenizer)
    train_records, eval_records, fmt = read_splits(recipe.data, ("preference",), recipe.train.seed)
    d = recipe.data
    train_set, stats = dpo_trl.pair_samples(tokenizer, train_records, d.max_length)
    eval_set, _ = dpo_trl.pair_samples(tokenizer, eval_records, d.max_length)
    if not train_set:
        raise _no_pairs(recipe)
    if stats.truncated:
        log.warning("%d of %d pairs are longer than data.max_length %d and are cut (%d left without a difference are skipped)",
                    stats.truncated, len(train_records), d.max_length, stats.dropped)

    # 2. How the model will be held: dtype, trainable parameters, parent adapters, memory.
    # A full fine-tune keeps a second, frozen copy of the weights as its reference unless it is precomputed.
    separate_ref = recipe.lora is None and not recipe.dpo.precompute_ref
    plan = plan_training(resolved, recipe.model, lora=recipe.lora, quant=recipe.quant, train=recipe.train,
                         head="causal", tokens_per_step=dpo_trl.tokens_per_step(recipe.train.batch_size, stats.lengths, d.max_length),
                         head_tile=dpo_trl.logprob_tile(), reference_copy=separate_ref)
    first = train_set[0]
    details = {
        "format": fmt,
        "train": stats.summary(),
        "eval_pairs": len(eval_set),
        "max_length": d.max_length,
        **plan.as_json(),
        "reference": "frozen copy of the model" if separate_ref else ("precomputed" if recipe.dpo.precompute_ref else "frozen copy of the starting adapter"),
        "sample_prompt": tokenizer.decode(first["prompt_ids"]),
        "sample_chosen": tokenizer.decode(first["chosen_ids"]),
        "sample_rejected": tokenizer.decode(first["rejected_ids"]),
    }
    # Built before anything is written: settings the machine cannot run (fp16 on a CPU) fail here.
    args = dpo_trl.dpo_args(recipe.train, recipe.dpo, Path(recipe.output_dir) / "checkpoints", precision=plan.precision,
                            has_eval=bool(eval_set), checkpointing=plan.checkpointing, max_length=d.max_length)
    if options.dry_run:
        return RunResult(stage="dpo", status="dry-run", output_dir=None, details=details)

    # 3. Claim the run directory, load, train.
    kept = plan.parent_adapters == "kept"
    run_dir = fitting.claim_run(recipe, "dpo", options, resolved, kept=kept,
                                 records=(train_records, eval_records))
    with fitting.failure_marked(run_dir):
        quantized = recipe.quant.bits is not None
        model = loading.load_model(resolved, dtype=plan.precision.load, quant=recipe.quant, merge_parent=not kept)
        ref_model = None
        if separate_ref:
            # Loaded like the policy, parent adapters merged: the starting policy, frozen.
            ref_model = loading.load_model(resolved, dtype=plan.precision.load).requires_grad_(False).eval()
        # Each sequence of a pair batch attends to itself in one padding-free row (core.dpo._backbone).
        kernel = attention.use_packed_attention(model)
        if ref_model is not None:
            attention.use_packed_attention(ref_model)
        model = lora.make_trainable(model, lora=recipe.lora, task="CAUSAL_LM", quantized=quantized,
                                      checkpointing=plan.checkpointing, seed=recipe.train.seed,
                                      parent_adapter=resolved.adapters[0] if kept else None)
        held = fitting.model_fields(model, plan, recipe.quant, stats.summary())
        run_dir.update(format=fmt, **held, chat_template=tokenizer.chat_template,
                       gradient_checkpointing=plan.checkpointing, reference=details["reference"],
                       attention=kernel or model.config._attn_implementation)
        trainer = dpo_trl.dpo_trainer(model, args, tokenizer, train_set, eval_set, ref_model=ref_model)
        outcome = fitting.fit(trainer, run_dir, "dpo")
        eval_metrics = fitting.evaluate(trainer, outcome) if eval_set else {}

        policy = dpo_trl.trained_policy(trainer)
        section = artifacts.save_outputs(run_dir.path, policy, tokenizer, state_dict=fitting.full_state_dict(trainer))
        metrics = fitting.run_metrics(outcome, eval_metrics)
        if "eval_rewards/accuracies" in eval_metrics:
            # Held-out preference accuracy and mean margin of the implicit reward, named as train-rm names its own.
            metrics.update(eval_accuracy=eval_metrics["eval_rewards/accuracies"], eval_margin=eval_metrics["eval_rewards/margins"])
        fitting.complete(run_dir, outcome, metrics, section)
    return RunResult(stage="dpo", status="completed", output_dir=str(run_dir.path), metrics=metrics,
                     details={"trainable_params": held["trainable_params"], "truncated": stats.truncated,
                              "dtype": plan.precision.as_json()["compute"]})


def _no_pairs(recipe: DPORecipe) -> Exception:
    from rlhf_cli.errors import DataError

    return DataError(
        f"{recipe.data.train}: no pair keeps an answer token and a difference within data.max_length "
        f"{recipe.data.max_length}: raise data.max_length"
    )

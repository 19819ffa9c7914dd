"""rlhf pretrain: causal-LM training on raw text, from scratch or continued from a model.

    rlhf pretrain recipes/tiny/pretrain.yaml
    rlhf pretrain recipes/tiny/pretrain.yaml --set model.init=pretrained --set model.path=runs/pretrain

Documents (a `text` column, or .txt files) are joined with EOS and cut into data.max_length blocks, so no
token is padded (data.packing: false trains one truncated document per sample instead). A model built
`from_config` takes its vocabulary from model.tokenizer. Reports perplexity on the eval split.
"""

from __future__ import annotations

import logging
from pathlib import Path

from rlhf_cli.recipe import PretrainRecipe
from rlhf_cli.result import RunOptions, RunResult

log = logging.getLogger("rlhf")


def run(recipe: PretrainRecipe, options: RunOptions) -> RunResult:
    from rlhf_cli.core import artifacts, attention, batches, loading, lora
    from rlhf_cli.core import trainer as fitting
    from rlhf_cli.core.data import read_splits
    from rlhf_cli.core.plan import plan_training
    from rlhf_cli.runs import ResolvedModel

    # 1. Tokenizer and data: every data problem surfaces here, before anything is written.
    scratch = recipe.model.init == "from_config"
    if scratch:
        resolved = ResolvedModel(base=recipe.model.path, tokenizer=recipe.model.tokenizer)
    else:
        resolved = loading.resolve(recipe.model)
    tokenizer = loading.load_tokenizer(resolved)
    train_records, eval_records, _ = read_splits(recipe.data, ("text",), recipe.train.seed)
    d = recipe.data
    train_set, stats = batches.text_blocks(tokenizer, train_records, d.max_length, d.packing)
    eval_set, _ = (batches.text_blocks(tokenizer, eval_records, d.max_length, d.packing, keep_tail=True)
                   if eval_records else ([], None))
    if not train_set:
        raise _too_short(recipe)

    # 2. How the model will be held: dtype, trainable parameters, memory.
    longest = min(d.max_length, max(len(s["input_ids"]) for s in train_set))
    plan = plan_training(resolved, recipe.model, lora=recipe.lora, quant=recipe.quant, train=recipe.train,
                         head="causal", tokens_per_step=recipe.train.batch_size * longest, tokenizer=tokenizer)
    details = {
        "documents": len(train_records),
        "train": stats.summary(),
        "eval_blocks": len(eval_set),
        "max_length": d.max_length,
        "packing": d.packing,
        **plan.as_json(),
        "sample": tokenizer.decode(train_set[0]["input_ids"][:64]),
    }
    if stats.truncated:
        log.warning("%d of %d documents are longer than data.max_length %d and are cut (data.packing: true keeps them)",
                    stats.truncated, len(train_records), d.max_length)
    # Built before anything is written: settings the machine cannot run (fp16 on a CPU) fail here.
    args = fitting.training_args(recipe.train, Path(recipe.output_dir) / "checkpoints", precision=plan.precision,
                                 has_eval=bool(eval_set), gradient_checkpointing=plan.checkpointing)
    if options.dry_run:
        return RunResult(stage="pretrain", status="dry-run", output_dir=None, details=details)

    # 3. Claim the run directory, build or load the model, train.
    kept = plan.parent_adapters == "kept"
    base = {"init": "from_config", "config": recipe.model.config.model_dump()} if scratch else None
    run_dir = fitting.claim_run(recipe, "pretrain", options, resolved, kept=kept, base=base,
                                 records=(train_records, eval_records))
    with fitting.failure_marked(run_dir):
        quantized = recipe.quant.bits is not None
        if scratch:
            model = loading.build_from_config(recipe.model, tokenizer, plan.precision.load, recipe.train.seed)
        else:
            model = loading.load_model(resolved, dtype=plan.precision.load, quant=recipe.quant,
                                      merge_parent=not kept)
        kernel = attention.use_packed_attention(model)  # used by rows of unequal length (data.packing: false)
        model = lora.make_trainable(model, lora=recipe.lora, task="CAUSAL_LM", quantized=quantized,
                                      checkpointing=plan.checkpointing, seed=recipe.train.seed,
                                      parent_adapter=resolved.adapters[0] if kept else None)
        held = fitting.model_fields(model, plan, recipe.quant, stats.summary())
        run_dir.update(**held, attention=kernel or model.config._attn_implementation,
                       gradient_checkpointing=plan.checkpointing)
        trainer = fitting.CausalTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set or None,
                                        data_collator=batches.FlatCollator())
        outcome = fitting.fit(trainer, run_dir, "pretrain", perplexity=True)
        eval_metrics = fitting.evaluate(trainer, outcome, perplexity=True) if eval_set else {}

        section = artifacts.save_outputs(run_dir.path, model, tokenizer, state_dict=fitting.full_state_dict(trainer))
        metrics = fitting.run_metrics(outcome, eval_metrics)
        fitting.complete(run_dir, outcome, metrics, section)
    return RunResult(stage="pretrain", status="completed", output_dir=str(run_dir.path), metrics=metrics,
                     details={"trainable_params": held["trainable_params"], "dtype": plan.precision.as_json()["compute"]})


def _too_short(recipe: PretrainRecipe) -> Exception:
    from rlhf_cli.errors import DataError

    return DataError(f"{recipe.data.train}: not enough text for one training block of data.max_length tokens")

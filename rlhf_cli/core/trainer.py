"""The one place where our `train:` section meets transformers' Trainer; version-sensitive calls live here.

    args = training_args(recipe.train, run.checkpoints, precision=plan, has_eval=bool(held_out))
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=held_out, data_collator=FlatCollator())
    outcome = fit(trainer, run, "sft")

fit() adds what every stage needs around trainer.train(): metrics.jsonl with every logged step, a
progress bar (rich on a terminal, log lines in CI), a stop with exit 1 on a NaN/inf loss or weights, a
checkpoint and exit 130 on SIGINT/SIGTERM, and resuming from the saved step with the metrics curve
continuing.

The run directory's steps that every trainer stage (pretrain, sft, train-rm, dpo) takes alike live here
too: claim_run, model_fields (run.json's account of the model as trained), run_metrics and complete.
What a stage loads, builds and saves stays in the stage.

Checkpoints are <run>/checkpoints/checkpoint-N; a COMPLETE file is dropped into each once Trainer has
finished writing it (runs.latest_checkpoint trusts no other). The loss and the trained weights are
checked after every optimizer step, before Trainer may save or rotate checkpoints, so a diverged step
ends the run and no checkpoint ever holds non-finite weights: those kept are the last finite ones.
For tests, RLHF_TEST_INTERRUPT_AT_STEP=k sends this process a SIGINT after optimizer step k, which
exercises the real signal path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from rlhf_cli.console import Progress
from rlhf_cli.core import artifacts, distributed
from rlhf_cli.core.device import Precision, peak_memory_bytes
from rlhf_cli.core.loading import count_parameters
from rlhf_cli.core.lora import track_optimizer
from rlhf_cli.core.memory import out_of_memory
from rlhf_cli.core.plan import TrainingPlan
from rlhf_cli.core.trackers import check_installed, point_trainer_trackers
from rlhf_cli.errors import Interrupted, RecipeError, TrainingError
from rlhf_cli.recipe import QuantSpec, TrainSpec
from rlhf_cli.recipe_load import dump_recipe
from rlhf_cli.result import RunOptions
from rlhf_cli.runs import (
    ResolvedModel,
    RunDir,
    atomic_write_json,
    checkpoint_step,
    is_main_process,
    mark_complete,
    prepare_run,
    prune_checkpoints,
)

log = logging.getLogger("rlhf")

# Renamed in transformers 5.x; the old name still works but warns.
_CHECKPOINTING = (
    "activation_checkpointing"
    if "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainingArguments)}
    else "gradient_checkpointing"
)
# In each checkpoint: the run's training time up to it, which a resumed run's run.json adds to its own.
TRAINING_TIME = "training_time.json"
# Timing details Trainer adds to every log; tokens/s stays.
_NOISE = ("_runtime", "_samples_per_second", "_steps_per_second")


def training_args(
    train: TrainSpec,
    output_dir: Path,
    *,
    precision: Precision,
    has_eval: bool,
    gradient_checkpointing: bool = False,
    count_tokens: str = "all",
    args_class: type[TrainingArguments] = TrainingArguments,
    **extra: Any,
) -> TrainingArguments:
    """Our small `train:` section mapped onto TrainingArguments, once for every stage.

    args_class and extra: a trainer's own subclass of TrainingArguments (trl's DPOConfig) and its fields.
    """
    report_to = _trackers(train.report_to, output_dir)
    if has_eval:
        eval_strategy = "steps" if train.eval_steps else ("epoch" if train.max_steps is None else "no")
    else:
        eval_strategy = "no"
    cuda = torch.cuda.is_available()
    if precision.autocast == torch.float16 and not cuda:
        raise RecipeError("dtype fp16 trains with loss scaling, which needs CUDA: use dtype bf16 or fp32 on the CPU")
    return args_class(
        output_dir=str(output_dir),
        num_train_epochs=train.epochs or 1,
        max_steps=train.max_steps or -1,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        learning_rate=train.lr,
        lr_scheduler_type=train.lr_scheduler,
        # A float below 1 is a share of the total steps (transformers >= 5 folded warmup_ratio into it).
        warmup_steps=train.warmup_ratio,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        seed=train.seed,
        data_seed=train.seed,
        logging_strategy="steps",
        logging_steps=train.logging_steps,
        logging_first_step=True,
        # Trainer hides NaN losses from the logs by default; the run must stop on them instead.
        logging_nan_inf_filter=False,
        include_num_input_tokens_seen=count_tokens,
        eval_strategy=eval_strategy,
        eval_steps=train.eval_steps,
        prediction_loss_only=True,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        bf16=precision.autocast == torch.bfloat16,
        fp16=precision.autocast == torch.float16,
        use_cpu=not cuda,
        **{_CHECKPOINTING: gradient_checkpointing},
        # Non-reentrant checkpointing works with frozen inputs (LoRA) without enable_input_require_grads.
        **{f"{_CHECKPOINTING}_kwargs": {"use_reentrant": False} if gradient_checkpointing else None},
        report_to=report_to or "none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=cuda,
        **extra,
    )


def _trackers(names: list[str], output_dir: Path) -> list[str]:
    check_installed(names, "train.report_to")
    # output_dir is the run's checkpoints/: the trackers write next to metrics.jsonl, in the run directory.
    point_trainer_trackers(names, Path(output_dir).parent)
    return list(names)


# --------------------------------------------------------------------------- the run around trainer.train()


@dataclass
class Outcome:
    """What a finished trainer.train() leaves for run.json."""

    steps: int
    train_loss: float | None
    runtime_s: float  # over every session of the run, as steps and tokens are
    cpu_s: float  # CPU time of this process over all its threads (wall time suffers from other load), every session
    tokens: int
    tokens_per_s: float | None
    resumed_from_step: int | None = None


class RunCallback(TrainerCallback):
    """metrics.jsonl, progress, NaN guard, graceful stop and checkpoint markers."""

    def __init__(self, run: RunDir, description: str, trainer: Trainer, *, perplexity: bool = False):
        self.run = run
        self.trainer = trainer
        self.description = description
        self.perplexity = perplexity
        self.stop_signal: int | None = None
        self.stopping = False  # agreed by every rank: a signal may reach the processes at different steps
        self.progress: Progress | None = None
        self._eval_progress: Progress | None = None
        self._loss: float | None = None
        self._interrupt_at = int(os.environ.get("RLHF_TEST_INTERRUPT_AT_STEP", "0") or 0)
        # train.save_total_limit, applied here rather than by Trainer (see fit).
        self.keep: int | None = None
        self.eval_s = 0.0  # this session's held-out evaluations, which Trainer's train_runtime includes
        # Training time of the sessions before this one (from the checkpoint resumed), and this one's start.
        self.before = {"runtime_s": 0.0, "cpu_s": 0.0}
        self.started = (time.perf_counter(), time.process_time())

    def request_stop(self, signum: int, _frame: Any = None) -> None:
        if self.stop_signal is not None:
            # A second Ctrl-C means: stop now, without waiting for the checkpoint.
            raise KeyboardInterrupt
        self.stop_signal = signum
        log.warning("%s received: saving a checkpoint after this step (again to abort at once)", signal.Signals(signum).name)

    def on_train_begin(self, args, state, control, **kwargs):
        track_optimizer(self.trainer.model, self.trainer.optimizer)  # the optimizer exists from here on
        self.progress = Progress(total=state.max_steps, description=self.description, start=state.global_step)
        self.progress.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        # Trainer saves right after this call (and old checkpoints then go): stop before a diverged
        # step can be saved. Every step, not only logged ones: a NaN loss makes NaN weights at once.
        loss = _loss_since_log(self.trainer)
        trained = [p for p in kwargs["model"].parameters() if p.requires_grad]
        if not distributed.all_finite([loss, *trained]):
            raise TrainingError(_diverged(distributed.total(float(loss)), state.global_step, args.learning_rate))
        if self.progress is not None:
            self.progress.update(state.global_step, **({"loss": self._loss} if self._loss is not None else {}))
        if self._interrupt_at and state.global_step == self._interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)
        self.stopping = self.stopping or distributed.any_rank(self.stop_signal is not None)
        if self.stopping:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        # A held-out evaluation can take minutes: it reports its batches as training reports its steps.
        if self._eval_progress is None:
            total = len(eval_dataloader) if eval_dataloader is not None else 0
            self._eval_progress = Progress(total=total, description=f"{self.description} eval", unit="batch")
            self._eval_progress.__enter__()
        self._eval_progress.advance()

    def on_evaluate(self, args, state, control, **kwargs):
        if self._eval_progress is not None:
            self._eval_progress.__exit__(None, None, None)
            self._eval_progress = None

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stopping:
            # The checkpoint was written at the step. Stopped mid-epoch, the loop broke early and no epoch
            # ended: no evaluation on the way out. Stopped on an epoch's last step (state.epoch whole), its
            # evaluation runs as it would have: the resumed run starts the next epoch and never makes it up.
            if not float(state.epoch or 0.0).is_integer():
                control.should_evaluate = False
            control.should_save = False
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.eval_s += float((logs or {}).get("eval_runtime", 0.0))
        logs = {k: v for k, v in (logs or {}).items() if not k.endswith(_NOISE)}
        if "train_loss" in logs:
            return  # the end-of-training summary, not a step
        if "eval_loss" in logs and not math.isfinite(logs["eval_loss"]):
            raise TrainingError(_diverged(logs["eval_loss"], state.global_step, args.learning_rate, what="eval_loss"))
        if "loss" in logs:
            self._loss = logs["loss"]
        if "eval_loss" in logs:
            if self.perplexity:
                logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
            shown = {k: v for k, v in logs.items() if k.startswith("eval_")}
            log.info("step %d: %s", state.global_step, " ".join(f"{k}={v:.4g}" for k, v in shown.items()))
        self.run.log_metrics({"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs, "time": time.time()})

    def on_save(self, args, state, control, **kwargs):
        # Every rank writes its own RNG state (and, under FSDP, its shard): all must be done first.
        distributed.barrier()
        if is_main_process():
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                atomic_write_json(folder / TRAINING_TIME, self.training_time())
                mark_complete(folder)
                prune_checkpoints(folder.parent, self.keep)

    def training_time(self, session_s: float | None = None) -> dict[str, float]:
        """The run's training time so far: the sessions before this one and this one (`session_s`, else
        the time since it started)."""
        wall, cpu = self.started
        session_s = time.perf_counter() - wall if session_s is None else session_s
        return {"runtime_s": self.before["runtime_s"] + session_s,
                "cpu_s": self.before["cpu_s"] + time.process_time() - cpu}

    def close(self) -> None:
        if self.progress is not None:
            self.progress.__exit__(None, None, None)
            self.progress = None


def _loss_since_log(trainer: Trainer) -> torch.Tensor:
    """The training losses summed on the device since the last log: every step's, read without a sync
    (Trainer's _tr_loss; its own logging_nan_inf_filter is off, so a NaN stays in the sum)."""
    return trainer._tr_loss


def _diverged(loss: float, step: int, lr: float, what: str = "loss") -> str:
    """The one line for a run that diverged: the non-finite loss where there is one, else the weights."""
    seen = f"{what} is {loss} at step {step}" if not math.isfinite(loss) else f"the trained weights are not finite after step {step}"
    return f"{seen}: training diverged; lower train.lr (now {lr:g}), check the data, or train in bf16/fp32 instead of fp16"


@contextlib.contextmanager
def _signals(handler: Any) -> Iterator[None]:
    """SIGINT/SIGTERM ask for a checkpoint and a clean stop while training runs; old handlers come back after."""
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def claim_run(
    recipe: Any, stage: str, options: RunOptions, resolved: ResolvedModel, *, kept: bool,
    records: tuple[list[Any], list[Any]], base: Any = None,
) -> RunDir:
    """The run directory of a trainer stage, claimed (runs.prepare_run): run.json starts with the recipe as
    written and as validated, the base model it trains from, the run it continues and a fingerprint of the
    (train, eval) records it reads. `kept`: the parent run's adapter is trained on rather than merged;
    `base`: run.json's base_model where the model is not the resolved one (a model built from a config)."""
    from rlhf_cli.core.data import fingerprint

    if base is None:
        base = artifacts.base_entry(resolved, recipe.model.path, parent_adapter_kept=kept)
    return prepare_run(recipe.output_dir, stage, dump_recipe(recipe), recipe.model_dump(mode="json"),
                       resume=options.resume, overwrite=options.overwrite, base_model=base,
                       parent_run=resolved.run_dir, inputs=[resolved], data_fingerprint=fingerprint(*records))


def model_fields(model: Any, plan: TrainingPlan, quant: QuantSpec, data: dict[str, Any]) -> dict[str, Any]:
    """What run.json says of the data and of the model as it is trained: precision, parent adapters,
    quantization and parameter counts."""
    trainable, total = count_parameters(model)
    return {
        "data": data,
        "precision": plan.precision.as_json(),
        "parent_adapters": plan.parent_adapters,
        "quantization": quant.model_dump() if quant.bits is not None else None,
        "trainable_params": trainable,
        "total_params": total,
    }


def run_metrics(outcome: Outcome, eval_metrics: dict[str, float]) -> dict[str, Any]:
    """The metrics of a trained run: last train loss, the final evaluation, steps and throughput."""
    return {
        "train_loss": outcome.train_loss,
        **eval_metrics,
        "steps": outcome.steps,
        "train_tokens_per_s": outcome.tokens_per_s,
    }


def complete(run: RunDir, outcome: Outcome, metrics: dict[str, Any], section: dict[str, Any]) -> None:
    """run.json completed: the metrics, the saved model (`section`, from artifacts.save_outputs) and the
    training's counts."""
    run.finish("completed", metrics, model=section, tokens_seen=outcome.tokens, train_runtime_s=outcome.runtime_s,
               train_cpu_s=outcome.cpu_s, resumed_from_step=outcome.resumed_from_step)


@contextlib.contextmanager
def failure_marked(run: RunDir) -> Iterator[None]:
    """Any error while the run directory is claimed leaves run.json saying so (status failed + the error)."""
    try:
        yield
    except (Interrupted, KeyboardInterrupt):
        if run.manifest.get("status") == "running":
            run.finish("interrupted")
        raise
    except BaseException as e:
        if run.manifest.get("status") == "running":
            message = getattr(e, "message", None) or f"{type(e).__name__}: {e}"
            run.finish("failed", error=message)
        raise


def fit(trainer: Trainer, run: RunDir, description: str, *, perplexity: bool = False) -> Outcome:
    """trainer.train() with our metrics, progress, NaN guard, resume and graceful interruption."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    # Trainer's own printer writes dicts to stdout, which carries only results here.
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    callback = RunCallback(run, description, trainer, perplexity=perplexity)
    trainer.add_callback(callback)
    # Trainer deletes old checkpoints (save_total_limit) inside its save, before on_save marks the new one
    # COMPLETE: a process killed in between would leave no checkpoint to resume from. They go once it is marked.
    callback.keep, trainer.args.save_total_limit = trainer.args.save_total_limit, None
    # Counts the samples this process reads: each rank trains on its own shard (DistributedSampler).
    trainer.train_dataset = counted = CountedDataset(trainer.train_dataset)

    resumed = None
    if run.resume_from is not None:
        resumed = checkpoint_step(run.resume_from)
        run.truncate_metrics(resumed)
        log.info("resuming from %s (step %d)", run.resume_from, resumed)
        if 0 < trainer.args.max_steps <= resumed:
            _train_no_step(trainer)
        saved = run.resume_from / TRAINING_TIME  # absent from checkpoints older than this file
        if saved.is_file():
            callback.before = {k: float(v) for k, v in json.loads(saved.read_text()).items()}
    callback.started = (time.perf_counter(), time.process_time())
    try:
        with _signals(callback.request_stop):
            result = trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from else None)
    except Exception as e:
        if not out_of_memory(e):
            raise
        raise TrainingError(
            f"out of memory at step {trainer.state.global_step}: lower train.batch_size or data.max_length, "
            "set train.gradient_checkpointing: true, or load the base in 4 bits (quant.bits: 4)"
        ) from None
    finally:
        callback.close()

    step = trainer.state.global_step
    if callback.stopping:
        checkpoint = run.checkpoints / f"checkpoint-{step}"
        run.finish("interrupted", checkpoint=str(checkpoint))
        raise Interrupted(
            f"interrupted at step {step}; checkpoint saved in {checkpoint}: continue with --resume auto"
        )
    args = trainer.args
    run.update(distributed=distributed.report(
        counted.read, global_batch_size=args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps),
        peak_memory_gb=round(peak_memory_bytes() / 2**30, 3))
    runtime = float(result.metrics.get("train_runtime", 0.0))
    total = callback.training_time(session_s=runtime)
    # Tokens per second of this session's training: the evaluations run during train() are no training time.
    training_s = runtime - callback.eval_s
    tokens = int(trainer.state.num_input_tokens_seen)
    session_tokens = tokens - int(getattr(trainer, "_initial_num_input_tokens_seen", 0) or 0)
    return Outcome(
        steps=step,
        train_loss=_last_train_loss(trainer),
        runtime_s=total["runtime_s"],
        cpu_s=total["cpu_s"],
        tokens=tokens,
        tokens_per_s=session_tokens / training_s if training_s > 0 and session_tokens > 0 else None,
        resumed_from_step=resumed,
    )


def _train_no_step(trainer: Trainer) -> None:
    """Make train() restore the checkpoint (weights, optimizer, state) and run no epoch: the checkpoint is
    at max_steps already (interrupted on the last step, or failed after it), and Trainer, which counts the
    epochs trained as global_step // steps per epoch, would skip those steps' batches and train one more
    before it checks max_steps (transformers 5.3-5.23)."""
    trainer._run_epoch = lambda *args, **kwargs: None


class CountedDataset(torch.utils.data.Dataset):
    """A training set that counts the samples read from it by this process."""

    def __init__(self, data: Any):
        self.data = data
        self.read = 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Any:
        self.read += 1
        return self.data[i]


def full_state_dict(trainer: Trainer) -> dict[str, Any] | None:
    """The whole model's weights where FSDP or DeepSpeed ZeRO-3 shard them, else None (saved as held).

    Gathering is a collective: every rank calls this, rank 0 gets the weights (accelerate's get_state_dict,
    what Trainer.save_model uses; ZeRO-3 needs zero3_save_16bit_model: true in the launch config).
    """
    if distributed.sharding() not in ("fsdp", "zero3"):
        return None
    return trainer.accelerator.get_state_dict(trainer.model_wrapped)


def evaluate(trainer: Trainer, outcome: Outcome, *, perplexity: bool = False) -> dict[str, float]:
    """Final evaluation, unless the last logged evaluation already happened at the final step."""
    history = [h for h in trainer.state.log_history if "eval_loss" in h]
    if history and history[-1].get("step") == outcome.steps:
        # Read from the state, which a resumed run restores: that evaluation may be the interrupted session's.
        metrics = dict(history[-1])
    else:
        metrics = trainer.evaluate()
    for key, value in metrics.items():
        if key == "eval_loss" and not math.isfinite(value):
            raise TrainingError(f"eval_loss is {value} after training: the model diverged; lower train.lr")
    if perplexity and "eval_loss" in metrics:
        metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
    return {k: v for k, v in metrics.items() if k.startswith("eval_") and not k.endswith(_NOISE)}


def _last_train_loss(trainer: Trainer) -> float | None:
    """Mean loss over the last logging window (the end-of-run average mixes in the first steps)."""
    for entry in reversed(trainer.state.log_history):
        if "loss" in entry:
            return float(entry["loss"])
    return None


# --------------------------------------------------------------------------- causal-LM loss


def _keeps_logits_by_mask() -> bool:
    """Whether this transformers projects to the vocabulary only where a boolean logits_to_keep mask says
    (a probe of the helper the models call, rather than a version number)."""
    try:
        from transformers.modeling_utils import slice_logits_to_keep

        kept = slice_logits_to_keep(torch.zeros(1, 3, 1), torch.tensor([[True, False, True]]))
    except (ImportError, TypeError, IndexError, RuntimeError):
        return False
    return tuple(kept.shape) == (2, 1)


_SELECTIVE_LOGITS = _keeps_logits_by_mask()


def causal_lm_loss(model: Any, batch: dict[str, Any], num_items: Any = None) -> tuple[torch.Tensor, Any]:
    """Next-token cross-entropy computed only where a label exists.

    Prompt tokens (completion-only loss) need no logits: skipping their vocabulary projection and fp32
    log-softmax saves much of a small model's work when its vocabulary is large (SmolLM2-135M's 49k words;
    bench/sft_throughput.py runs rlhf sft against trl). Summed and divided by num_items, the label count
    over all micro-batches of the optimizer step, as Trainer does.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch["labels"]
    if not _SELECTIVE_LOGITS:
        outputs = model(**inputs, labels=labels, num_items_in_batch=num_items)
        return outputs.loss, outputs
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    targets = labels[:, 1:][keep[:, :-1]]
    outputs = model(**inputs, logits_to_keep=keep)
    loss = torch.nn.functional.cross_entropy(outputs.logits.float().reshape(-1, outputs.logits.shape[-1]), targets,
                                             reduction="sum")
    count = num_items if num_items is not None else targets.numel()
    return loss / torch.as_tensor(count, device=loss.device, dtype=loss.dtype), outputs


class CausalTrainer(Trainer):
    """Trainer with causal_lm_loss (logits only where labels are), and an eval_loss that is the mean over
    the held-out set's label tokens.

    Trainer's evaluation averages each batch's loss weighted by its rows, and a padding-free batch is one
    row: its eval_loss was the plain mean of batch means, which weighs a token of a short batch more than
    one of a long batch. Here the evaluation also sums each batch's token NLL and label count (tensors, no
    host read per batch) and eval_loss becomes their ratio over every process.
    """

    _eval_sums: torch.Tensor | None = None

    def evaluation_loop(self, *args, **kwargs):
        metric_key_prefix = kwargs.get("metric_key_prefix", "eval")
        self._eval_sums = torch.zeros(2, dtype=torch.float64, device=self.args.device)
        try:
            output = super().evaluation_loop(*args, **kwargs)
            sums = self._eval_sums
        finally:
            self._eval_sums = None
        if distributed.world_size() > 1:
            import torch.distributed as dist

            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        nll, tokens = sums.tolist()
        if tokens > 0 and f"{metric_key_prefix}_loss" in output.metrics:
            output.metrics[f"{metric_key_prefix}_loss"] = nll / tokens
        return output

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        evaluating = self._eval_sums is not None and not model.training
        repeats = _repeated_samples(self.accelerator, inputs) if evaluating else None
        if repeats is not None and repeats.any():
            # Under several processes accelerate completes the last held-out batch with samples from the
            # start of the set: their labels count in no sum (gather_for_metrics' rule). A batch of repeats
            # alone keeps its labels, for a finite loss, and adds nothing.
            if repeats.all():
                evaluating = False
            else:
                inputs = {**inputs, "labels": inputs["labels"].masked_fill(repeats, -100)}
        loss, outputs = causal_lm_loss(model, inputs, num_items_in_batch)
        if evaluating:
            # causal_lm_loss divides this batch's NLL sum by num_items (the label count of every process,
            # where Trainer passes it) or else by this batch's own label count.
            count = (inputs["labels"][:, 1:] != -100).sum()
            divided_by = count if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, device=count.device)
            nll = loss.detach().double() * divided_by.double()
            self._eval_sums += torch.stack([nll, count.double()]).to(self._eval_sums.device)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts the labels of all ranks while DDP averages gradients over them:
            # scale back up, as Trainer.compute_loss does.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss


def _repeated_samples(accelerator: Any, inputs: dict[str, Any]) -> torch.Tensor | None:
    """Where this process's batch holds samples accelerate repeated to even out the last batch (a bool
    mask shaped like the labels), or None when it holds none (real_samples' rule). A flattened row
    (FlatCollator) holds its samples one after another, each starting at position 0.
    """
    state = accelerator.gradient_state
    if accelerator.num_processes == 1 or not state.end_of_dataloader or state.remainder <= 0:
        return None
    labels = inputs["labels"]
    flat = labels.shape[0] == 1 and "position_ids" in inputs
    sample = (inputs["position_ids"] == 0).long().cumsum(1) - 1 if flat else \
        torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)
    per_process = int(sample.max()) + 1
    real = real_samples(accelerator, per_process)
    return sample >= real if real < per_process else None


def real_samples(accelerator: Any, per_process: int) -> int:
    """How many of the `per_process` samples of this process's evaluation batch are real, the first ones;
    the others are repeats accelerate added to even out the last batch under several processes.

    Each process's last batch has as many samples, and the global batch is the processes' in rank order,
    the `remainder` real samples first (gather_for_metrics' rule).
    """
    state = accelerator.gradient_state
    if accelerator.num_processes == 1 or not state.end_of_dataloader or state.remainder <= 0:
        return per_process
    return min(max(state.remainder - accelerator.process_index * per_process, 0), per_process)


# --------------------------------------------------------------------------- reward model training


class RewardTrainer(Trainer):
    """Reward model on rankings (a pair is the ranking of two): the mean over each prompt's pairs of
    -log sigmoid(r_better - r_worse), one prompt one sample (Ouyang et al. 2022; core.ranking), plus an
    optional center_rewards_coef * (r_better + r_worse)^2 that keeps scores near zero (Eisenstein et al.
    2023), weighted as the pairs are."""

    def __init__(self, *args: Any, center_rewards_coef: float | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.center_rewards_coef = center_rewards_coef

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from rlhf_cli.core.reward import sequence_scores

        rewards = sequence_scores(model, inputs["input_ids"], inputs["attention_mask"])
        loss = self.reward_loss(rewards, inputs["groups"])
        return (loss, {"rewards": rewards}) if return_outputs else loss

    def reward_loss(self, rewards: torch.Tensor, groups: list[list[tuple[int, int]]]) -> torch.Tensor:
        from rlhf_cli.core.ranking import pair_weights, ranking_loss

        loss = ranking_loss(rewards, groups)
        if self.center_rewards_coef:
            better, worse, weight = pair_weights(groups, rewards.device)
            centred = ((rewards[better] + rewards[worse]) ** 2 * weight).sum() / sum(1 for g in groups if g)
            loss = loss + self.center_rewards_coef * centred
        return loss

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """Held-out comparisons scored by the scorer `rlhf eval` uses (core.reward.score_rows: the same ids,
        batches of similar length, the same pooling), so eval_accuracy here and eval's rm_accuracy are one
        computation. Every rank scores the whole set (sharded weights then take part in every forward)."""
        from transformers.trainer_utils import EvalLoopOutput

        from rlhf_cli.core.ranking import pair_margins
        from rlhf_cli.core.reward import score_rows

        samples = dataloader.dataset
        rows, groups = [], []
        for sample in samples:
            offset = len(rows)
            rows.extend(sample["response_ids"])
            groups.append([(offset + b, offset + w) for b, w in sample["pairs"]])
        model = self.model_wrapped
        model.eval()
        with self.compute_loss_context_manager():
            rewards = torch.tensor(score_rows(model, rows, self.data_collator.pad, 2 * self.args.per_device_eval_batch_size))
        margins = pair_margins(rewards, groups)
        metrics = {"loss": float(self.reward_loss(rewards, groups)), "accuracy": float((margins > 0).float().mean()),
                   "margin": float(margins.mean())}
        return EvalLoopOutput(predictions=None, label_ids=None, num_samples=len(samples),
                              metrics={f"{metric_key_prefix}_{k}": v for k, v in metrics.items()})

"""The PPO loop, flat: rollout -> score -> rewards and advantages -> epochs of minibatches -> log -> checkpoint.

The math lives in rlhf_cli/ppo/algo.py; this file only orders the steps, times them, logs them and
makes them resumable. RLHF PPO as in Ziegler et al. 2019 and Ouyang et al. 2022, with the details of
Huang et al. 2024 ("The N Implementation Details of RLHF with PPO"). The critic-free methods (GRPO and
relatives, `rlhf grpo`) run the same loop: rlhf_cli/ppo/method.py says what differs (no value role, a
group of answers per prompt, the advantage estimator, where the KL goes).

What stops a run stops every rank at the same point with the same message (NaN scores, NaN losses,
non-finite weights): a rank that raised alone would leave the others waiting in their next collective.
The weights are checked after every iteration's update, so a checkpoint never holds non-finite ones.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import signal
import time
import traceback
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rlhf_cli.console import Progress
from rlhf_cli.core import distributed
from rlhf_cli.core.checks import mean_and_error, warn_if_length_collapsed
from rlhf_cli.core.generation import token_logprobs
from rlhf_cli.core.lora import lora_arithmetic, track_optimizer
from rlhf_cli.core.memory import out_of_memory
from rlhf_cli.core.trackers import Trackers
from rlhf_cli.errors import Interrupted, RecipeError, TrainingError
from rlhf_cli.ppo import algo
from rlhf_cli.ppo.build import Models
from rlhf_cli.ppo.method import Method, method_of
from rlhf_cli.ppo.rollout import Rollout, sample_rollout, token_stats
from rlhf_cli.recipe import OnlineRecipe
from rlhf_cli.runs import RunDir, atomic_write_json, is_main_process, mark_complete, prune_checkpoints

log = logging.getLogger("rlhf")


@dataclass
class Prompts:
    raw: list[Any]  # as in the data: a string or a message list (what reward functions receive)
    texts: list[str]  # rendered with the policy's chat template and generation prompt


class PromptOrder:
    """A fresh seeded shuffle of the prompts each epoch; position n is the n-th prompt drawn overall."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._cache: dict[int, list[int]] = {}

    def _epoch(self, e: int) -> list[int]:
        if e not in self._cache:
            order = list(range(self.n))
            random.Random(self.seed * 100_003 + e).shuffle(order)
            self._cache = {e: order}
        return self._cache[e]

    def take(self, position: int, count: int) -> list[int]:
        return [self._epoch(p // self.n)[p % self.n] for p in range(position, position + count)]


@dataclass
class State:
    iteration: int = 0
    prompt_position: int = 0
    score_start: float | None = None
    high_clip_streak: int = 0
    last: dict[str, float] = field(default_factory=dict)
    # Responses this process sampled in every session of the run (each rank samples for its share of the prompts).
    samples: int = 0


class StopRequest:
    """SIGINT/SIGTERM ask the loop to stop after the current iteration (which is then checkpointed)."""

    def __init__(self) -> None:
        self.signal: int | None = None

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        def handler(signum: int, _frame: Any) -> None:
            if self.signal is not None:  # a second Ctrl-C: stop now, without a checkpoint
                raise KeyboardInterrupt
            self.signal = signum
            log.warning("%s received: finishing this iteration, then saving a checkpoint", signal.Signals(signum).name)

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def train(recipe: OnlineRecipe, models: Models, tokenizer: Any, prompts: Prompts, run: RunDir, accelerator: Any) -> dict[str, Any]:
    """Run the remaining iterations; return the summary metrics for run.json."""
    method = method_of(recipe)
    spec, gen, key = method.spec, recipe.generation, method.stage
    acc = accelerator
    world, rank = acc.num_processes, acc.process_index
    if method.prompts_per_rollout % world or spec.mini_batch_size % (world * spec.grad_accum):
        raise RecipeError(
            f"{key}.rollout_batch_size {spec.rollout_batch_size} ({method.prompts_per_rollout} prompts) and "
            f"{key}.mini_batch_size {spec.mini_batch_size} must split evenly over {world} processes x {spec.grad_accum} grad_accum"
        )
    # Each process samples and trains on its share of the rollout (whole groups of answers to a prompt);
    # statistics are reduced over all of them.
    micro = spec.mini_batch_size // (world * spec.grad_accum)
    mini = micro * spec.grad_accum

    actor = models.actor
    params = [p for p in actor.parameters() if p.requires_grad]
    lr = recipe.learning_rate()[0]
    # eps 1e-5 as in the lm-human-preferences / OpenAI baselines PPO (Huang et al. 2024).
    optimizer = adamw(params, lr=lr, eps=1e-5, weight_decay=0.0)
    track_optimizer(actor, optimizer)
    model, optimizer = acc.prepare(actor, optimizer)
    kl_ctl = (algo.make_kl_controller(spec.kl_coef, method.ppo.kl_target, method.ppo.kl_horizon) if method.ppo is not None
              else algo.FixedKLController(spec.kl_coef))
    shuffle = torch.Generator().manual_seed(spec.seed)
    if rank > 0:
        # Each process samples from its own stream (rank 0 keeps the single process's): with seed's stream
        # on all of them, a prompt sampled by two processes got the same answers twice. The weights were
        # built before, from the one seed, as on every rank.
        torch.manual_seed(spec.seed + 1_000_003 * rank)
    state = State()
    if run.resume_from is not None:
        state = load_checkpoint(run.resume_from, actor, optimizer, kl_ctl, shuffle, rank)
        run.truncate_metrics(state.iteration)
        log.info("resuming at iteration %d from %s", state.iteration + 1, run.resume_from)

    update = UpdateContext(model, optimizer, acc, params, method, shuffle, mini, micro,
                           temperature=gen.temperature, max_new_tokens=gen.max_new_tokens, lr=lr)
    order = PromptOrder(len(prompts.raw), spec.seed)
    device = next(actor.parameters()).device
    vocab = actor.generator().get_output_embeddings().weight.shape[0]
    whiten_reduce = acc.reduce if world > 1 else None
    stop = StopRequest()
    trackers = Trackers(spec.report_to if is_main_process() else [], run.path, first_step=state.iteration + 1,
                        config=recipe.model_dump(mode="json"))

    with stop.installed(), Progress(spec.iterations, key, start=state.iteration, unit="iteration") as bar, \
            failures_explained(state, recipe), trackers:
        while state.iteration < spec.iterations:
            it = state.iteration + 1
            cpu0 = time.process_time()
            # group_size answers to each prompt, in consecutive rows (algo.group_advantages reads them so).
            picked = [i for i in order.take(state.prompt_position, method.prompts_per_rollout)[rank::world]
                      for _ in range(method.group_size)]
            batch_prompts = [prompts.raw[i] for i in picked]
            state.samples += len(picked)

            # 1. rollout: sample from the current policy, computed exactly as it is scored and trained
            with lora_arithmetic(actor, "exact"), actor.compute():
                rollout = sample_rollout(actor.generator(), tokenizer, [prompts.texts[i] for i in picked], gen)
            # 2. score: log-probs (policy, and the reference unless the KL weighs nothing), values with a
            #    critic, and the reward's score
            t0 = time.perf_counter()
            with lora_arithmetic(actor, "exact"):
                logp, ref_logp, values, entropy = token_stats(model, actor.reference_logits if method.reference else None,
                                                              rollout, gen.temperature, scoring_rows(rollout, micro, vocab))
            # The reward model computes as it was trained (train-rm's LoRA in the activation dtype).
            raw_scores = torch.tensor(models.scorer(batch_prompts, rollout.texts), dtype=torch.float32, device=device)
            t_score = time.perf_counter() - t0
            nonfinite = sum(distributed.gather_ints(int((~torch.isfinite(raw_scores)).sum())))
            if nonfinite:
                raise TrainingError(f"iteration {it}: the reward returned NaN/inf for {nonfinite} of {spec.rollout_batch_size} "
                                    "responses: make the reward function (or model) return finite scores")

            # 3. rewards and advantages
            scores = raw_scores.clone()
            if spec.missing_eos_penalty is not None:
                # Responses cut at max_new_tokens would otherwise be scored as if they were finished (Huang et al. 2024).
                scores = torch.where(rollout.ended, scores, scores - spec.missing_eos_penalty)
            scores = algo.clip_scores(scores, spec.reward_clip)
            mask = rollout.mask
            batch = {"old_logp": logp}
            if method.ppo is not None:
                assert ref_logp is not None and values is not None
                if method.ppo.whiten_rewards:
                    scores = algo.whiten_scores(scores, reduce=whiten_reduce)
                rewards, kl = algo.per_token_rewards(scores, logp, ref_logp, mask, kl_ctl.value, method.kl_kind)
                advantages, returns = algo.gae(rewards, values, mask, method.ppo.gamma, method.ppo.lam)
                advantages = algo.masked_whiten(advantages, mask, reduce=whiten_reduce)
                batch.update(old_values=values, returns=returns)
            else:
                in_reward = kl_ctl.value if method.kl_in == "reward" else 0.0
                advantages, kl = algo.critic_free_advantages(scores, logp, ref_logp, mask, method.group_size, method.advantage,
                                                             in_reward, method.kl_kind, reduce=whiten_reduce)
                if method.kl_in == "loss" and ref_logp is not None:
                    batch["ref_logp"] = ref_logp
            batch["advantages"] = advantages

            # 4. epochs of clipped updates over shuffled minibatches
            t0 = time.perf_counter()
            with lora_arithmetic(actor, "exact"):
                stats = ppo_update(update, rollout, batch, it)
            t_train = time.perf_counter() - t0
            # The last optimizer step of an iteration meets no loss check before the checkpoint is written.
            if not distributed.all_finite(params):
                raise TrainingError(f"iteration {it}: the policy or value weights are not finite after the update: "
                                    f"lower {key}.lr (now {lr:g}) or set {key}.reward_clip")

            # 5. KL controller, metrics, warnings
            seq_kl = kl.sum(1)
            beta = kl_ctl.value
            kl_ctl.update(_mean(acc, seq_kl), spec.rollout_batch_size)
            all_scores = acc.gather(raw_scores) if world > 1 else raw_scores
            gen_tokens = _sum(acc, mask.sum().float())
            # The processes sample, score and train side by side: a phase took the run as long as its slowest
            # process, and the throughputs are every process's tokens over that time.
            t_gen, t_score, t_train = distributed.longest([rollout.seconds, t_score, t_train])
            record: dict[str, float] = {
                "step": it,
                "score_mean": float(all_scores.mean()),
                "score_std": float(all_scores.std()) if all_scores.numel() > 1 else 0.0,
            }
            if method.reference:  # without a reference pass there is no KL to report
                record.update(kl=_mean(acc, seq_kl), kl_coef=beta)
            if not method.critic:
                # Groups whose answers all scored the same carry no signal under a group baseline.
                same, spread = algo.group_reward_stats(scores, method.group_size)
                record.update(zero_std_groups=_mean(acc, same), group_reward_std=_mean(acc, spread))
            record.update({
                "entropy": _token_mean(acc, entropy, mask),
                **stats,
                "response_length": _mean(acc, mask.sum(1).float()),
                "eos_fraction": _mean(acc, rollout.ended.float()),
                # Cut at max_new_tokens and, unless missing_eos_penalty is set, scored as finished turns.
                "truncated_fraction": _mean(acc, (~rollout.ended).float()),
                "time_generation": t_gen,
                "time_scoring": t_score,
                "time_training": t_train,
                # CPU seconds of this process (all its threads): the work done, whatever else shares the machine.
                "cpu_seconds": time.process_time() - cpu0,
                "tokens_per_s_generation": gen_tokens / max(t_gen, 1e-9),
                "tokens_per_s_training": spec.ppo_epochs * _sum(acc, rollout.attention_mask.sum().float()) / max(t_train, 1e-9),
            })
            if state.score_start is None:
                state.score_start = record["score_mean"]
            state.iteration, state.prompt_position = it, state.prompt_position + method.prompts_per_rollout
            state.last = record
            run.log_metrics(record)
            trackers.log(record, it)
            bar.update(it, score=record["score_mean"], **({"kl": record["kl"]} if "kl" in record else {}),
                       clipfrac=record["clipfrac"])
            warn_if_unstable(record, state, it, key, kl_se=mean_and_error((acc.gather(seq_kl) if world > 1 else seq_kl).tolist())[1])
            if it == spec.iterations:
                warn_if_length_collapsed(run.metrics_file)

            # A signal may reach the processes in different iterations: all stop at the first that sees one.
            stopping = distributed.any_rank(stop.signal is not None)
            if it % spec.save_steps == 0 or stopping or it == spec.iterations:
                save_checkpoint(run, actor, optimizer, kl_ctl, shuffle, state, acc, spec.save_total_limit)
            if stopping:
                run.finish("interrupted", metrics=summary(state))
                why = signal.Signals(stop.signal).name if stop.signal is not None else "signal on another process"
                raise Interrupted(f"stopped after iteration {it} ({why}); checkpoint saved: continue with --resume auto")
    run.update(distributed=distributed.report(state.samples, global_batch_size=spec.rollout_batch_size))
    return summary(state)


@contextmanager
def failures_explained(state: State, recipe: OnlineRecipe) -> Iterator[None]:
    """Out of memory, and the math refusing the numbers of a diverged policy (NaN sampling probabilities, a
    NaN KL, no response tokens left to whiten), as one line with what to lower instead of a traceback."""
    key = recipe.rl.section
    try:
        yield
    except Exception as e:
        it = state.iteration + 1
        if out_of_memory(e):
            quant = "" if recipe.quant.bits == 4 else ", or load the base in 4 bits (quant.bits: 4)"
            raise TrainingError(f"out of memory in iteration {it}: lower {key}.rollout_batch_size, {key}.mini_batch_size, "
                                f"generation.max_new_tokens or data.max_prompt_length{quant}") from None
        if _refused_by_the_math(e):
            raise TrainingError(f"iteration {it}: {str(e).splitlines()[0]}: the policy diverged; "
                                f"lower {key}.lr (now {recipe.learning_rate()[0]:g}) or {key}.ppo_epochs") from None
        raise


def _refused_by_the_math(e: BaseException) -> bool:
    """An argument check of algo.py, or torch refusing to sample from NaN/inf probabilities."""
    if isinstance(e, RuntimeError) and "probability tensor contains" in str(e):
        return True
    frames = traceback.extract_tb(e.__traceback__)
    return isinstance(e, ValueError) and bool(frames) and frames[-1].filename == algo.__file__


def adamw(params: list[Tensor], **kwargs: Any) -> torch.optim.Optimizer:
    """AdamW, fused where torch has a fused kernel for these tensors (on a CPU, a LoRA parameter list steps
    several times faster fused than in torch's per-tensor loop)."""
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, **kwargs)


def scoring_rows(rollout: Rollout, micro: int, vocab: int, budget_bytes: int = 256 * 2**20) -> int:
    """Rows per no-grad scoring pass: as many as keep one pass's fp32 logits within budget_bytes, at least
    the training micro-batch (fewer, larger passes score the same rows in less time)."""
    per_row = 4 * max(rollout.n_response, 1) * vocab
    return max(micro, min(rollout.response_ids.shape[0], budget_bytes // per_row))


@dataclass(frozen=True)
class UpdateContext:
    """What every iteration's update works with, set up once per run by train()."""

    model: Any  # the actor as accelerate prepared it (wrapped for DDP on several processes)
    optimizer: Any
    acc: Any  # the Accelerator
    params: list[Tensor]  # the trainable parameters, whose gradients are clipped together
    method: Method
    shuffle: torch.Generator  # the minibatch order, checkpointed with the run
    mini: int  # rollout rows per optimizer step on this process
    micro: int  # rows per forward + backward (mini / grad_accum)
    temperature: float  # the sampling temperature: log-probs are taken as the samples were drawn
    max_new_tokens: int  # the token budget of the "budget" loss aggregation (Dr. GRPO)
    lr: float  # named in the error when a loss is not finite


def ppo_update(update: UpdateContext, rollout: Rollout, batch: dict[str, Tensor], it: int) -> dict[str, float]:
    """ppo_epochs passes over the rollout in shuffled minibatches; one optimizer step per minibatch.

    On one process the policy pass is backpropagated before the value pass runs, so only one role's
    activations are alive at a time (half the peak). Under DDP both passes go through one forward and
    one backward of the wrapped model, which is what its gradient synchronisation expects. Without a
    critic there is the policy pass alone, plus the KL loss term when the method puts the KL there
    (``batch["ref_logp"]``).
    """
    model, optimizer, acc, method = update.model, update.optimizer, update.acc, update.method
    spec, key, mini, micro = method.spec, method.stage, update.mini, update.micro
    actor = acc.unwrap_model(model)
    n, R = rollout.response_ids.shape
    agg, budget = method.aggregation, update.max_new_tokens
    sums: dict[str, list[Tensor]] = defaultdict(list)
    # What each micro-step's statistic weighs in the reported mean: its tokens for a token mean, so the figure
    # is the mean over every token it was taken on, not a mean of micro-batch means that weighs a token of a
    # short micro-batch more; 1 for the surrogate averaged per answer or over the budget (micro-batches hold
    # as many answers).
    weights: dict[str, list[Tensor]] = defaultdict(list)
    per_answer = {"policy_loss", "kl_loss"} if agg != "token" else set()

    # A token mean is over the mini-batch's tokens on every rank: each micro-batch's mean weighs by its share.
    row_tokens = rollout.mask.sum(1).float()

    def policy_terms(logits: Tensor, idx: Tensor, share: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logp = token_logprobs(logits, rollout.response_ids[idx], update.temperature)
        loss, stats = algo.policy_loss(logp, batch["old_logp"][idx], batch["advantages"][idx], rollout.mask[idx],
                                       spec.clip_range, agg, budget)
        stats["policy_loss"] = loss.detach()
        if "ref_logp" in batch:
            kl = algo.kl_loss(logp, batch["ref_logp"][idx], rollout.mask[idx], method.kl_kind, agg, budget)
            stats["kl_loss"] = kl.detach()
            loss = loss + spec.kl_coef * kl
        return (loss * share if agg == "token" else loss), stats

    def value_terms(values: Tensor, idx: Tensor, share: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        assert method.ppo is not None
        loss, stats = algo.value_loss(values, batch["old_values"][idx], batch["returns"][idx], rollout.mask[idx],
                                      method.ppo.value_clip_range)
        predicted[idx] = values.detach().to(predicted.dtype)
        # Taken over each epoch's predictions at once instead (see algo.explained_variance).
        stats.pop("explained_variance")
        return method.ppo.vf_coef * loss * share, {"value_loss": loss.detach(), **stats}

    # Losses and statistics stay tensors until the iteration's end: reading one (float, .item(), a Python
    # bool) waits for the device to drain its queue, and a micro-step took about 11 such reads.
    losses: list[tuple[str, int, Tensor]] = []

    def finite(loss: Tensor, what: str, epoch: int) -> Tensor:
        losses.append((what, epoch, loss.detach()))
        return loss

    for epoch in range(spec.ppo_epochs):
        perm = torch.randperm(n, generator=update.shuffle).to(rollout.response_ids.device)
        predicted = torch.zeros_like(batch["returns"]) if method.critic else None  # this epoch's value predictions
        shares = iter(token_shares(row_tokens, perm, mini, micro, acc))
        for start in range(0, n - mini + 1, mini):
            for m in range(start, start + mini, micro):
                idx = perm[m : m + micro]
                share = next(shares)
                ids, attn, pos = rollout.rows(idx)
                with acc.accumulate(model):
                    if method.critic and acc.num_processes == 1:
                        pg_loss, pg = policy_terms(actor.policy_logits(ids, attn, pos, R), idx, share)
                        acc.backward(finite(pg_loss, "policy", epoch))
                        vf_loss, vf = value_terms(actor.values(ids, attn, pos, R), idx, share)
                        acc.backward(finite(vf_loss, "value", epoch))
                    else:
                        logits, values = model(ids, attn, pos, R)  # values None without a critic
                        loss, pg = policy_terms(logits, idx, share)
                        vf = {}
                        if values is not None:
                            vf_loss, vf = value_terms(values, idx, share)
                            loss = loss + vf_loss
                        acc.backward(finite(loss, "policy" if values is None else "policy + value", epoch))
                    if acc.sync_gradients:
                        acc.clip_grad_norm_(update.params, spec.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                tokens = row_tokens[idx].sum()
                for k, v in {**pg, **vf}.items():
                    sums[k].append(v.detach())
                    weights[k].append(torch.ones_like(tokens) if k in per_answer else tokens)
        if predicted is not None:
            sums["explained_variance"].append(algo.explained_variance(
                predicted, batch["returns"], rollout.mask, reduce=acc.reduce if acc.num_processes > 1 else None))
            weights["explained_variance"].append(row_tokens.sum())
    out, finite_at = reduce_stats(sums, [loss for _, _, loss in losses], weights)
    # Every rank decides together (a rank that raised alone would leave the others in a collective); a
    # non-finite loss made non-finite weights too, which the caller's check would find before any save.
    if distributed.any_rank(finite_at is not None):
        what, epoch = losses[finite_at][:2] if finite_at is not None else ("policy", 0)
        raise TrainingError(f"{what} loss is not finite at iteration {it}, epoch {epoch + 1}: "
                            f"lower {key}.lr (now {update.lr:g}) or set {key}.reward_clip")
    return out


def token_shares(row_tokens: Tensor, perm: Tensor, mini: int, micro: int, acc: Any) -> Tensor:
    """For each micro-batch of an epoch, in order: the factor that turns its token mean into its part of
    its mini-batch's token mean over every process.

    A micro-batch's loss is the mean over its own tokens; accelerate divides each by grad_accum and DDP
    averages the gradients over the processes, so without the factor the step follows the mean of the
    micro-batches' means, which weighs a token of a short micro-batch more and changes with grad_accum and
    the process count. The factor is tokens(micro) x grad_accum x processes / tokens(mini, all processes);
    one reduction per epoch, no host read.
    """
    starts = range(0, perm.numel() - mini + 1, mini)
    per_micro = torch.stack([row_tokens[perm[m : m + micro]].sum() for s in starts for m in range(s, s + mini, micro)])
    per_micro = per_micro.view(len(starts), mini // micro)
    per_mini = per_micro.sum(1)
    if acc.num_processes > 1:
        per_mini = acc.reduce(per_mini, reduction="sum")
    return (per_micro * (mini // micro * acc.num_processes) / per_mini.clamp_min(1)[:, None]).flatten()


def reduce_stats(sums: dict[str, list[Tensor]], losses: list[Tensor],
                 weights: dict[str, list[Tensor]] | None = None) -> tuple[dict[str, float], int | None]:
    """The weighted means of an update's per-micro-step statistics (ratio_max: their maximum) over every
    process, and the index of this process's first non-finite loss (None if all are finite), read from the
    device in one transfer. ``weights`` holds each value's weight (its tokens for a token mean); without
    one, a value weighs 1."""
    keys = list(sums)
    peak = [k == "ratio_max" for k in keys]
    nums, dens = [], []
    for k in keys:
        x = torch.stack(sums[k]).float()
        w = torch.stack(weights[k]).float().to(x.device) if weights and k in weights else torch.ones_like(x)
        nums.append(x.amax() if k == "ratio_max" else (x * w).sum())
        dens.append(w.sum())
    parts = nums
    if nums:
        num, den = torch.stack(nums), torch.stack(dens)
        is_peak = torch.tensor(peak, device=num.device)
        if distributed.world_size() > 1:
            import torch.distributed as dist

            summed, maxes = torch.cat([torch.where(is_peak, 0.0, num), den]), num.clone()
            dist.all_reduce(summed, op=dist.ReduceOp.SUM)
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX)
            num, den = torch.where(is_peak, maxes, summed[: len(keys)]), summed[len(keys):]
        parts = list(torch.where(is_peak, num, num / den.clamp_min(1e-12)))
    device = parts[0].device if parts else torch.device("cpu")
    flags = (~torch.isfinite(torch.stack(losses).float())).float() if losses else torch.zeros(0)
    values = torch.cat([torch.stack(parts) if parts else torch.zeros(0), flags.to(device)]).tolist()
    bad = [i for i, flag in enumerate(values[len(keys):]) if flag]
    return dict(zip(keys, values[: len(keys)])), (bad[0] if bad else None)


def warn_if_unstable(record: dict[str, float], state: State, it: int, key: str = "ppo", kl_se: float = 0.0) -> None:
    """The numbers that explain an unstable run, said out loud (trl#1017, trl#1857). `kl_se`: the standard
    error of the rollout's mean sequence KL (NaN for one sample counts as none); near the reference the k1
    estimate of a few samples is negative about half the time, which says nothing about how they were drawn."""
    kl_se = kl_se if math.isfinite(kl_se) else 0.0
    if record.get("kl", 0.0) < -max(0.05, 2 * kl_se):
        log.warning(
            "iteration %d: mean KL to the reference is negative (%.3g nats, %.2g standard errors below zero): the "
            "samples are not drawn from the distribution PPO scores; top_k/top_p truncation does this, and a negative "
            "KL penalty rewards drifting", it, record["kl"], -record["kl"] / kl_se if kl_se > 0 else float("inf"))
    if record["ratio_max"] > 10 or abs(record["ratio_mean"] - 1) > 0.2:
        log.warning(
            "iteration %d: policy ratio exploded (mean %.3g, max %.3g): lower %s.lr, raise %s.mini_batch_size, "
            "or lower %s.ppo_epochs", it, record["ratio_mean"], record["ratio_max"], key, key, key)
    state.high_clip_streak = state.high_clip_streak + 1 if record["clipfrac"] > 0.3 else 0
    if state.high_clip_streak == 3:
        log.warning(
            "clip fraction above 0.3 for 3 iterations (now %.2f): updates are too large; lower %s.lr or %s.ppo_epochs",
            record["clipfrac"], key, key)


def summary(state: State) -> dict[str, Any]:
    last = state.last
    return {
        "iterations": state.iteration,
        "score_start": state.score_start,
        "score_end": last.get("score_mean"),
        "kl_end": last.get("kl"),
        "kl_coef_end": last.get("kl_coef"),
        "response_length_end": last.get("response_length"),
    }


def _mean(acc: Any, t: Tensor) -> float:
    t = t.float().mean()
    return float(acc.reduce(t, reduction="mean") if acc.num_processes > 1 else t)


def _sum(acc: Any, t: Tensor) -> float:
    return float(acc.reduce(t, reduction="sum") if acc.num_processes > 1 else t)


def _token_mean(acc: Any, x: Tensor, mask: Tensor) -> float:
    """Mean of x over the real tokens of every process (processes sample answers of unequal lengths)."""
    total = torch.stack([torch.where(mask, x.float(), 0).sum(), mask.sum().float()])
    if acc.num_processes > 1:
        total = acc.reduce(total, reduction="sum")
    return float(total[0] / total[1].clamp_min(1))


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(run: RunDir, actor: Any, optimizer: Any, kl_ctl: Any, shuffle: torch.Generator, state: State,
                    acc: Any, keep: int) -> Path:
    """checkpoints/checkpoint-N/: adapters (or weights), value head, optimizer, KL controller, RNG, position.

    COMPLETE is written last, so a crash mid-save leaves a checkpoint that resume skips; train() calls this
    only once the iteration's weights were found finite, so only finite checkpoints are kept.
    """
    path = run.checkpoints / f"checkpoint-{state.iteration}"
    samples = distributed.gather_ints(state.samples)  # a collective: every rank saves
    if is_main_process():
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        actor.save(path / "policy", path / "value")
        torch.save(optimizer.state_dict(), path / "optimizer.pt")
        atomic_write_json(path / "state.json", {
            "iteration": state.iteration, "prompt_position": state.prompt_position, "score_start": state.score_start,
            "high_clip_streak": state.high_clip_streak, "last": state.last, "kl_controller": kl_ctl.state_dict(),
            "samples_per_rank": samples,
        })
    acc.wait_for_everyone()
    # Every rank has its own RNG streams; tensors and JSON only, so loading needs no pickle.
    torch.save({"torch": torch.get_rng_state(), "shuffle": shuffle.get_state(),
                **({"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {})},
               path / f"rng-{acc.process_index}.pt")
    atomic_write_json(path / f"rng-{acc.process_index}.json", _host_rng_state())
    acc.wait_for_everyone()
    if is_main_process():
        mark_complete(path)
        prune_checkpoints(run.checkpoints, keep)
    return path


def load_checkpoint(path: Path, actor: Any, optimizer: Any, kl_ctl: Any, shuffle: torch.Generator, rank: int) -> State:
    path = Path(path)
    meta = json.loads((path / "state.json").read_text())
    actor.load(path / "policy", path / "value")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    kl_ctl.load_state_dict(meta["kl_controller"])
    rng_file = path / f"rng-{rank}.pt"
    if rng_file.exists():  # resuming on more processes than saved: the new ranks start fresh streams
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        shuffle.set_state(rng["shuffle"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        _set_host_rng_state(json.loads((path / f"rng-{rank}.json").read_text()))
    # A rank the saved run did not have (more processes now), or a checkpoint from before the count was kept, starts at 0.
    samples = meta.get("samples_per_rank") or []
    return State(iteration=meta["iteration"], prompt_position=meta["prompt_position"], score_start=meta["score_start"],
                 high_clip_streak=meta["high_clip_streak"], last=meta["last"],
                 samples=samples[rank] if rank < len(samples) else 0)


def _host_rng_state() -> dict[str, Any]:
    import numpy as np

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def _set_host_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))

"""The PPO loop, flat: rollout -> score -> rewards and advantages -> epochs of minibatches -> log -> checkpoint.

The math lives in rlhf_cli/ppo/algo.py; this file only orders the steps, times them, logs them and
makes them resumable. RLHF PPO as in Ziegler et al. 2019 and Ouyang et al. 2022, with the details of
Huang et al. 2024 ("The N Implementation Details of RLHF with PPO").

What stops a run stops every rank at the same point with the same message (NaN scores, NaN losses,
non-finite weights): a rank that raised alone would leave the others waiting in their next collective.
The weights are checked after every iteration's update, so a checkpoint never holds non-finite ones.
"""

from __future__ import annotations

import json
import logging
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
from rlhf_cli.core.checks import warn_if_length_collapsed
from rlhf_cli.core.memory import out_of_memory
from rlhf_cli.core.models import exact_lora
from rlhf_cli.errors import Interrupted, RecipeError, TrainingError
from rlhf_cli.ppo import algo
from rlhf_cli.ppo.models import Models
from rlhf_cli.ppo.rollout import Rollout, encode_prompts, eos_token_ids, generate, token_stats
from rlhf_cli.recipe import PPORecipe
from rlhf_cli.runs import RunDir, atomic_write_json, is_main_process, mark_complete

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


def train(recipe: PPORecipe, models: Models, tokenizer: Any, prompts: Prompts, run: RunDir, accelerator: Any) -> dict[str, Any]:
    """Run the remaining iterations; return the summary metrics for run.json."""
    ppo, gen = recipe.ppo, recipe.generation
    acc = accelerator
    world, rank = acc.num_processes, acc.process_index
    if ppo.rollout_batch_size % world or ppo.mini_batch_size % (world * ppo.grad_accum):
        raise RecipeError(
            f"ppo.rollout_batch_size {ppo.rollout_batch_size} and ppo.mini_batch_size {ppo.mini_batch_size} must split "
            f"evenly over {world} processes x {ppo.grad_accum} grad_accum"
        )
    # Each process samples and trains on its share of the rollout; statistics are reduced over all of them.
    micro = ppo.mini_batch_size // (world * ppo.grad_accum)
    mini = micro * ppo.grad_accum

    actor = models.actor
    params = [p for p in actor.parameters() if p.requires_grad]
    # eps 1e-5 as in the lm-human-preferences / OpenAI baselines PPO (Huang et al. 2024).
    optimizer = adamw(params, lr=recipe.learning_rate()[0], eps=1e-5, weight_decay=0.0)
    model, optimizer = acc.prepare(actor, optimizer)
    kl_ctl = algo.make_kl_controller(ppo.kl_coef, ppo.kl_target, ppo.kl_horizon)
    shuffle = torch.Generator().manual_seed(ppo.seed)
    state = State()
    if run.resume_from is not None:
        state = load_checkpoint(run.resume_from, actor, optimizer, kl_ctl, shuffle, rank)
        run.truncate_metrics(state.iteration)
        log.info("resuming at iteration %d from %s", state.iteration + 1, run.resume_from)

    order = PromptOrder(len(prompts.raw), ppo.seed)
    device = next(actor.parameters()).device
    eos_ids = eos_token_ids(tokenizer, actor.generator())
    vocab = actor.generator().get_output_embeddings().weight.shape[0]
    whiten_reduce = acc.reduce if world > 1 else None
    stop = StopRequest()
    generated = 0  # responses sampled by this process (each rank samples for its share of the prompts)

    with stop.installed(), Progress(ppo.iterations, "ppo", start=state.iteration, unit="iteration") as bar, \
            failures_explained(state, recipe):
        while state.iteration < ppo.iterations:
            it = state.iteration + 1
            cpu0 = time.process_time()
            picked = order.take(state.prompt_position, ppo.rollout_batch_size)[rank::world]
            batch_prompts = [prompts.raw[i] for i in picked]
            generated += len(picked)

            # 1. rollout: sample from the current policy, computed exactly as it is scored and trained
            with exact_lora(), actor.compute():
                rollout = generate(actor.generator(), tokenizer,
                                   encode_prompts(tokenizer, [prompts.texts[i] for i in picked], device), gen, eos_ids)
            # 2. score: log-probs (policy, reference), values, and the reward model's score
            t0 = time.perf_counter()
            with exact_lora():
                logp, ref_logp, values, entropy = token_stats(model, actor.reference_logits, rollout, gen.temperature,
                                                              scoring_rows(rollout, micro, vocab))
            # The reward model computes as it was trained (train-rm's LoRA in the activation dtype).
            raw_scores = torch.tensor(models.scorer(batch_prompts, rollout.texts), dtype=torch.float32, device=device)
            t_score = time.perf_counter() - t0
            nonfinite = sum(distributed.gather_ints(int((~torch.isfinite(raw_scores)).sum())))
            if nonfinite:
                raise TrainingError(f"iteration {it}: the reward returned NaN/inf for {nonfinite} of {ppo.rollout_batch_size} "
                                    "responses: make the reward function (or model) return finite scores")

            # 3. rewards and advantages
            scores = raw_scores.clone()
            if ppo.missing_eos_penalty is not None:
                # Responses cut at max_new_tokens would otherwise be scored as if they were finished (Huang et al. 2024).
                scores = torch.where(rollout.ended, scores, scores - ppo.missing_eos_penalty)
            scores = algo.clip_scores(scores, ppo.reward_clip)
            if ppo.whiten_rewards:
                scores = algo.whiten_scores(scores, reduce=whiten_reduce)
            mask = rollout.mask
            rewards, kl = algo.per_token_rewards(scores, logp, ref_logp, mask, kl_ctl.value, ppo.kl_estimator)
            advantages, returns = algo.gae(rewards, values, mask, ppo.gamma, ppo.lam)
            advantages = algo.masked_whiten(advantages, mask, reduce=whiten_reduce)

            # 4. PPO epochs over shuffled minibatches
            t0 = time.perf_counter()
            batch = {"old_logp": logp, "old_values": values, "advantages": advantages, "returns": returns}
            with exact_lora():
                stats = ppo_update(model, optimizer, acc, params, rollout, batch, recipe, shuffle, mini, micro, it)
            t_train = time.perf_counter() - t0
            # The last optimizer step of an iteration meets no loss check before the checkpoint is written.
            if not distributed.all_finite(params):
                raise TrainingError(f"iteration {it}: the policy or value weights are not finite after the update: "
                                    f"lower ppo.lr (now {recipe.learning_rate()[0]:g}) or set ppo.reward_clip")

            # 5. KL controller, metrics, warnings
            seq_kl = kl.sum(1)
            beta = kl_ctl.value
            kl_ctl.update(_mean(acc, seq_kl), ppo.rollout_batch_size)
            all_scores = acc.gather(raw_scores) if world > 1 else raw_scores
            gen_tokens = _sum(acc, mask.sum().float())
            record = {
                "step": it,
                "score_mean": float(all_scores.mean()),
                "score_std": float(all_scores.std()) if all_scores.numel() > 1 else 0.0,
                "kl": _mean(acc, seq_kl),
                "kl_coef": beta,
                "entropy": _mean(acc, algo.masked_mean(entropy, mask)),
                **stats,
                "response_length": _mean(acc, mask.sum(1).float()),
                "eos_fraction": _mean(acc, rollout.ended.float()),
                # Cut at max_new_tokens and, unless ppo.missing_eos_penalty is set, scored as finished turns.
                "truncated_fraction": _mean(acc, (~rollout.ended).float()),
                "time_generation": rollout.seconds,
                "time_scoring": t_score,
                "time_training": t_train,
                # CPU seconds of this process (all its threads): the work done, whatever else shares the machine.
                "cpu_seconds": time.process_time() - cpu0,
                "tokens_per_s_generation": gen_tokens / max(rollout.seconds, 1e-9),
                "tokens_per_s_training": recipe.ppo.ppo_epochs * _sum(acc, rollout.attention_mask.sum().float()) / max(t_train, 1e-9),
            }
            if state.score_start is None:
                state.score_start = record["score_mean"]
            state.iteration, state.prompt_position = it, state.prompt_position + ppo.rollout_batch_size
            state.last = record
            run.log_metrics(record)
            bar.update(it, score=record["score_mean"], kl=record["kl"], clipfrac=record["clipfrac"])
            warn_if_unstable(record, state, it)
            if it == ppo.iterations:
                warn_if_length_collapsed(run.metrics_file)

            # A signal may reach the processes in different iterations: all stop at the first that sees one.
            stopping = distributed.any_rank(stop.signal is not None)
            if it % ppo.save_steps == 0 or stopping or it == ppo.iterations:
                save_checkpoint(run, actor, optimizer, kl_ctl, shuffle, state, acc, ppo.save_total_limit)
            if stopping:
                run.finish("interrupted", metrics=summary(state))
                why = signal.Signals(stop.signal).name if stop.signal is not None else "signal on another process"
                raise Interrupted(f"stopped after iteration {it} ({why}); checkpoint saved: continue with --resume auto")
    run.update(distributed=distributed.report(generated, global_batch_size=ppo.rollout_batch_size))
    return summary(state)


@contextmanager
def failures_explained(state: State, recipe: PPORecipe) -> Iterator[None]:
    """Out of memory, and the math refusing the numbers of a diverged policy (NaN sampling probabilities, a
    NaN KL, no response tokens left to whiten), as one line with what to lower instead of a traceback."""
    try:
        yield
    except Exception as e:
        it = state.iteration + 1
        if out_of_memory(e):
            quant = "" if recipe.quant.bits == 4 else ", or load the base in 4 bits (quant.bits: 4)"
            raise TrainingError(f"out of memory in iteration {it}: lower ppo.rollout_batch_size, ppo.mini_batch_size, "
                                f"generation.max_new_tokens or data.max_prompt_length{quant}") from None
        if _refused_by_the_math(e):
            raise TrainingError(f"iteration {it}: {str(e).splitlines()[0]}: the policy diverged; "
                                f"lower ppo.lr (now {recipe.learning_rate()[0]:g}) or ppo.ppo_epochs") from None
        raise


def _refused_by_the_math(e: BaseException) -> bool:
    """An argument check of algo.py, or torch refusing to sample from NaN/inf probabilities."""
    if isinstance(e, RuntimeError) and "probability tensor contains" in str(e):
        return True
    frames = traceback.extract_tb(e.__traceback__)
    return isinstance(e, ValueError) and bool(frames) and frames[-1].filename == algo.__file__


def adamw(params: list[Tensor], **kwargs: Any) -> torch.optim.Optimizer:
    """AdamW, fused where torch has a fused kernel for these tensors (a third of the step time of the
    per-tensor loop on 9.8M LoRA parameters of SmolLM2-135M on a CPU: 12 ms instead of 33)."""
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, **kwargs)


def scoring_rows(rollout: Rollout, micro: int, vocab: int, budget_bytes: int = 256 * 2**20) -> int:
    """Rows per no-grad scoring pass: as many as keep one pass's fp32 logits within budget_bytes, at least
    the training micro-batch (fewer, larger passes: 8 rows of SmolLM2-135M scored in 0.86x the time of 2 x 4)."""
    per_row = 4 * max(rollout.n_response, 1) * vocab
    return max(micro, min(rollout.response_ids.shape[0], budget_bytes // per_row))


def ppo_update(model: Any, optimizer: Any, acc: Any, params: list[Tensor], rollout: Rollout, batch: dict[str, Tensor],
               recipe: PPORecipe, shuffle: torch.Generator, mini: int, micro: int, it: int) -> dict[str, float]:
    """ppo_epochs passes over the rollout in shuffled minibatches; one optimizer step per minibatch.

    On one process the policy pass is backpropagated before the value pass runs, so only one role's
    activations are alive at a time (half the peak). Under DDP both passes go through one forward and
    one backward of the wrapped model, which is what its gradient synchronisation expects.
    """
    ppo = recipe.ppo
    actor = acc.unwrap_model(model)
    one_process = acc.num_processes == 1
    n, R = rollout.response_ids.shape
    sums: dict[str, list[float]] = defaultdict(list)

    def policy_terms(logits: Tensor, idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logp = algo.logprobs_from_logits(logits, rollout.response_ids[idx], recipe.generation.temperature)
        return algo.policy_loss(logp, batch["old_logp"][idx], batch["advantages"][idx], rollout.mask[idx], ppo.clip_range)

    def value_terms(values: Tensor, idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return algo.value_loss(values, batch["old_values"][idx], batch["returns"][idx], rollout.mask[idx],
                               ppo.value_clip_range)

    def finite(loss: Tensor, what: str, epoch: int) -> Tensor:
        # Decided by every rank before backward, whose gradient all-reduce a rank that raised alone would miss.
        if distributed.any_rank(not bool(torch.isfinite(loss))):
            raise TrainingError(f"{what} loss is not finite at iteration {it}, epoch {epoch + 1}: "
                                f"lower ppo.lr (now {recipe.learning_rate()[0]:g}) or set ppo.reward_clip")
        return loss

    for epoch in range(ppo.ppo_epochs):
        perm = torch.randperm(n, generator=shuffle).to(rollout.response_ids.device)
        for start in range(0, n - mini + 1, mini):
            for m in range(start, start + mini, micro):
                idx = perm[m : m + micro]
                ids, attn, pos = rollout.rows(idx)
                with acc.accumulate(model):
                    if one_process:
                        pg_loss, pg = policy_terms(actor.policy_logits(ids, attn, pos, R), idx)
                        acc.backward(finite(pg_loss, "policy", epoch))
                        vf_loss, vf = value_terms(actor.values(ids, attn, pos, R), idx)
                        acc.backward(finite(ppo.vf_coef * vf_loss, "value", epoch))
                    else:
                        logits, values = model(ids, attn, pos, R)
                        (pg_loss, pg), (vf_loss, vf) = policy_terms(logits, idx), value_terms(values, idx)
                        acc.backward(finite(pg_loss + ppo.vf_coef * vf_loss, "policy + value", epoch))
                    if acc.sync_gradients:
                        acc.clip_grad_norm_(params, ppo.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                sums["policy_loss"].append(pg_loss.item())
                sums["value_loss"].append(vf_loss.item())
                for k, v in {**pg, **vf}.items():
                    sums[k].append(float(v))
    out = {k: sum(v) / len(v) for k, v in sums.items() if k != "ratio_max"}
    out["ratio_max"] = max(sums["ratio_max"])
    return out


def warn_if_unstable(record: dict[str, float], state: State, it: int) -> None:
    """The numbers that explain an unstable run, said out loud (trl#1017, trl#1857)."""
    if record["kl"] < -0.05:
        log.warning(
            "iteration %d: mean KL to the reference is negative (%.3g nats): the samples are not drawn from the "
            "distribution PPO scores; top_k/top_p truncation does this, and a negative KL penalty rewards drifting", it, record["kl"])
    if record["ratio_max"] > 10 or abs(record["ratio_mean"] - 1) > 0.2:
        log.warning(
            "iteration %d: policy ratio exploded (mean %.3g, max %.3g): lower ppo.lr, raise ppo.mini_batch_size, "
            "or lower ppo.ppo_epochs", it, record["ratio_mean"], record["ratio_max"])
    state.high_clip_streak = state.high_clip_streak + 1 if record["clipfrac"] > 0.3 else 0
    if state.high_clip_streak == 3:
        log.warning(
            "clip fraction above 0.3 for 3 iterations (now %.2f): updates are too large; lower ppo.lr or ppo.ppo_epochs",
            record["clipfrac"])


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


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(run: RunDir, actor: Any, optimizer: Any, kl_ctl: Any, shuffle: torch.Generator, state: State,
                    acc: Any, keep: int) -> Path:
    """checkpoints/checkpoint-N/: adapters (or weights), value head, optimizer, KL controller, RNG, position.

    COMPLETE is written last, so a crash mid-save leaves a checkpoint that resume skips; train() calls this
    only once the iteration's weights were found finite, so _prune rotates finite checkpoints only.
    """
    path = run.checkpoints / f"checkpoint-{state.iteration}"
    if is_main_process():
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        actor.save(path / "policy", path / "value")
        torch.save(optimizer.state_dict(), path / "optimizer.pt")
        atomic_write_json(path / "state.json", {
            "iteration": state.iteration, "prompt_position": state.prompt_position, "score_start": state.score_start,
            "high_clip_streak": state.high_clip_streak, "last": state.last, "kl_controller": kl_ctl.state_dict(),
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
        _prune(run.checkpoints, keep)
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
    return State(iteration=meta["iteration"], prompt_position=meta["prompt_position"], score_start=meta["score_start"],
                 high_clip_streak=meta["high_clip_streak"], last=meta["last"])


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


def _prune(root: Path, keep: int) -> None:
    done = sorted((int(p.name.split("-")[1]), p) for p in root.glob("checkpoint-*") if (p / "COMPLETE").exists())
    for _, p in done[:-keep]:
        shutil.rmtree(p, ignore_errors=True)

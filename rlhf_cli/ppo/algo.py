"""The math of RLHF PPO as small pure torch functions; the PPO loop calls these and keeps no math itself.

    PYTHONPATH=. python -m pytest tests/test_ppo_algo.py -q

Conventions shared by every function here:

- Per-token tensors are ``[batch, T]`` over *response* tokens only (the prompt is cut off by the caller).
- A ``mask`` is a bool or float tensor of the same shape, nonzero for real tokens. Masks are treated as
  binary (not as weights) and are assumed right-padded: real tokens first, then padding.
- Masked-out positions may hold anything, including NaN or inf: they are selected away with
  ``torch.where`` rather than multiplied by zero, and every per-token output is 0 there.
- float16/bfloat16 inputs are upcast; results are float32 (float64 stays float64).
- Nothing here waits on the device except ``masked_whiten`` (one check that there are enough entries) and the KL controllers, which hold a Python float.

Sources: Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences") for the KL-shaped
reward and the adaptive KL controller (and their lm-human-preferences code for the defaults), Ouyang
et al. 2022 for the same reward shape at scale, and Huang et al. 2024 ("The N Implementation Details of
RLHF with PPO") for the masking, whitening, clipping and temperature details. The critic-free
advantages: Shao et al. 2024 (GRPO, "DeepSeekMath"), Liu et al. 2025 (Dr. GRPO, "Understanding R1-Zero-Like
Training"), Ahmadian et al. 2024 (RLOO, "Back to Basics") and Hu 2025 (REINFORCE++).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from rlhf_cli.recipe import Advantage
from rlhf_cli.recipe import KLEstimator as KLKind

# A sum all-reduce over ranks that returns the reduced tensor, e.g. ``accelerator.reduce`` (its default
# reduction is "sum"). Note that ``torch.distributed.all_reduce`` works in place and returns None, so wrap
# it: ``def reduce(t): dist.all_reduce(t); return t``.
Reduce = Callable[[Tensor], Tensor]

# Added to the variance before the square root when whitening, as in the lm-human-preferences code.
WHITEN_EPS = 1e-8
# Added to a group's score std before dividing by it (trl's GRPO): a group whose answers all scored the
# same gets advantages of 0, not 0 / 0.
GROUP_STD_EPS = 1e-4

# How a per-token loss becomes one number, see ``aggregate``.
Aggregation = Literal["token", "sequence", "budget"]


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        if t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _as_bool(mask: Tensor, like: Tensor, name: str = "mask") -> Tensor:
    if mask.shape != like.shape:
        raise ValueError(
            f"{name} has shape {tuple(mask.shape)} but the values have shape {tuple(like.shape)}"
        )
    return mask if mask.dtype == torch.bool else mask != 0


# --------------------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------------------


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is nonzero.

    Args:
        x: values, any shape.
        mask: same shape as ``x``; nonzero marks entries to average.
        dim: reduce only this dimension; None reduces everything to a 0-d tensor.

    Returns:
        The mean (float32 or wider). Where a slice has no real entry the result is 0, not NaN, so an
        empty row or an all-padding micro-batch cannot poison a loss.
    """
    m = _as_bool(mask, x)
    x = x.to(_compute_dtype(x))
    total = torch.where(m, x, 0).sum() if dim is None else torch.where(m, x, 0).sum(dim)
    count = m.sum() if dim is None else m.sum(dim)
    return total / count.clamp_min(1).to(total.dtype)


def _masked_moments(x: Tensor, mask: Tensor, reduce: Reduce | None) -> tuple[Tensor, Tensor]:
    """Mean and unbiased variance over masked entries (all dimensions at once), optionally summed over
    ranks with ``reduce``; fewer than 2 real entries is a ValueError.

    Two passes (mean first, then centred squares) rather than E[x^2] - E[x]^2, which cancels badly when
    the mean is large relative to the spread. ``reduce`` is called exactly twice on every rank, whatever
    the local data, so the collectives always match up.
    """
    m = _as_bool(mask, x)
    x = x.to(_compute_dtype(x))
    local = torch.stack([torch.where(m, x, 0).sum(), m.sum().to(x.dtype)])
    total, count = reduce(local) if reduce is not None else local
    # One cheap host sync: a variance from fewer entries is meaningless and would otherwise surface
    # later as inf/NaN advantages far from the cause.
    if count.item() < 2:
        raise ValueError(
            f"masked variance needs at least 2 real entries, got {int(count.item())}; "
            "check the response mask"
        )
    mean = total / count
    sq = torch.where(m, (x - mean) ** 2, 0).sum()
    if reduce is not None:
        sq = reduce(sq.reshape(1)).reshape(())
    var = sq / (count - 1)
    return mean, var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, reduce: Reduce | None = None) -> Tensor:
    """Normalise ``x`` to mean 0 and unit (unbiased) variance over masked entries; 0 at masked positions.

    Used on advantages (Huang et al. 2024, detail "advantage whitening") and optionally on rewards.

    Args:
        x: values, any shape (typically ``[batch, T]`` advantages).
        mask: same shape as ``x``.
        shift_mean: if False, only scale: the mean is added back, so the sign of the data is kept. This is
            what reward whitening wants (``whiten_scores``), where shifting would change which tokens are rewarded.
        reduce: optional sum all-reduce over ranks (see ``Reduce``), so that every rank whitens with the
            statistics of the whole global batch; pass ``accelerator.reduce``. None = local statistics.

    Returns:
        Whitened values (float32 or wider), 0 where ``mask`` is 0.

    Raises:
        ValueError: fewer than 2 real entries (over all ranks when ``reduce`` is given).
    """
    mean, var = _masked_moments(x, mask, reduce)
    x = x.to(mean.dtype)
    out = (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        out = out + mean
    return torch.where(_as_bool(mask, x), out, 0)


def whiten_scores(scores: Tensor, shift_mean: bool = False, reduce: Reduce | None = None) -> Tensor:
    """Scale sequence-level reward-model scores ``[batch]`` to unit variance across the rollout (all
    entries count), keeping their mean by default.

    The mean stays because a score is a terminal reward beside the per-token KL penalty: a constant
    shift c reaches token t of a T-token response as ``c * (gamma * lam) ** (T - t)`` in GAE, so moving the
    mean changes which tokens are rewarded and what length pays, batch by batch. trl's PPO whitens its
    rewards with ``shift_mean=False`` too. Ziegler et al. instead fix a gain and bias once, so that scores
    on the initial policy have mean 0 and std 1. ``reduce`` works as in ``masked_whiten``.
    """
    return masked_whiten(
        scores, torch.ones_like(scores, dtype=torch.bool), shift_mean=shift_mean, reduce=reduce
    )


def clip_scores(scores: Tensor, clip: float | None) -> Tensor:
    """Clamp scores to ``[-clip, clip]`` so one outlier reward cannot dominate a batch; None = unchanged."""
    if clip is None:
        return scores
    if clip <= 0:
        raise ValueError(f"clip must be positive, got {clip}")
    return scores.clamp(-clip, clip)


# --------------------------------------------------------------------------------------------------
# Response masks
# --------------------------------------------------------------------------------------------------



def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: KLKind = "k1") -> Tensor:
    """Per-token estimate of KL(policy || reference) from log-probs of tokens sampled from the policy.

    With ``d = logp - ref_logp`` (see http://joschu.net/blog/kl-approx.html for k1/k2/k3):

    - ``"k1"``: ``d``. Unbiased, can be negative per token; the estimator of Ziegler et al. and
      Ouyang et al., and the one whose sequence sum the adaptive controller's target refers to.
    - ``"k2"``: ``0.5 * d**2``. Biased, non-negative, low variance.
    - ``"k3"``: ``(r - 1) - log r`` with ``r = exp(-d)``. Unbiased and non-negative.
    - ``"abs"``: ``|d|``.

    Returns a tensor of the same shape (float32 or wider). Apply the mask yourself, or use
    ``per_token_rewards``.
    """
    dtype = _compute_dtype(logp, ref_logp)
    d = logp.to(dtype) - ref_logp.to(dtype)
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d.square()
    if kind == "k3":
        # expm1 keeps precision when the policies are close (d ~ 0), where r - 1 would cancel.
        return torch.expm1(-d) + d
    if kind == "abs":
        return d.abs()
    raise ValueError(f"unknown KL estimator {kind!r}; expected one of k1, k2, k3, abs")


def per_token_rewards(
    scores: Tensor,
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    kl_coef: float | Tensor,
    kind: KLKind = "k1",
) -> tuple[Tensor, Tensor]:
    """The RLHF reward: a KL penalty at every token plus the sequence score at the last real token.

    ``rewards[b, t] = -kl_coef * kl[b, t] + (score[b] if t is the last real token of row b else 0)``
    (Ziegler et al. 2019, eq. 2; Ouyang et al. 2022). The last real token is the EOS for rows that ended,
    or the final kept token of a truncated row. Rows with no real token get no score.

    Args:
        scores: ``[batch]`` reward-model scores (already clipped/whitened/penalised as desired).
        logp: ``[batch, T]`` log-probs of the sampled tokens under the rollout policy.
        ref_logp: ``[batch, T]`` log-probs of the same tokens under the frozen reference model.
        mask: ``[batch, T]`` response mask.
        kl_coef: the KL coefficient beta, e.g. ``controller.value``; a float or a tensor broadcastable to
            ``[batch, T]``.
        kind: the KL estimator, see ``kl_penalty``.

    Returns:
        ``(rewards, kl)``, both ``[batch, T]`` and 0 where ``mask`` is 0. ``kl`` is the unscaled per-token
        estimate, for logging and for the adaptive controller (``kl.sum(1).mean()``). Pass detached inputs:
        rewards are targets, not something to differentiate.
    """
    m = _as_bool(mask, logp)
    if scores.shape != logp.shape[:1]:
        raise ValueError(f"scores must have shape [batch]={tuple(logp.shape[:1])}, got {tuple(scores.shape)}")
    kl = torch.where(m, kl_penalty(logp, ref_logp, kind), 0)
    # The last real token is the one with exactly one real token at or after it.
    at_last = m & (m.flip(1).cumsum(1).flip(1) == 1)
    score_term = torch.where(at_last, scores.to(kl.dtype).unsqueeze(1), 0)
    rewards = torch.where(m, -kl_coef * kl + score_term, 0)
    return rewards, kl


# --------------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------------


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over response tokens, run backwards in time.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``, where the
    step after the last real token is terminal: its value and advantage count as 0, so the values the
    critic predicts at padding never leak into real tokens. RLHF PPO uses ``gamma=1, lam=0.95``, the
    lm-human-preferences defaults (Huang et al. 2024).

    Advantages are returned raw; whiten them with ``masked_whiten`` (typically over the whole rollout
    batch) if desired. Returns use the raw advantages either way.

    Args:
        rewards: ``[batch, T]`` per-token rewards, e.g. from ``per_token_rewards``.
        values: ``[batch, T]`` value-head predictions from the rollout (detached).
        mask: ``[batch, T]`` response mask (right-padded).
        gamma: discount factor.
        lam: GAE lambda; 1 gives Monte-Carlo returns minus values, 0 gives one-step TD errors.

    Returns:
        ``(advantages, returns)`` with ``returns = advantages + values``; both 0 where ``mask`` is 0.
    """
    m = _as_bool(mask, rewards)
    _as_bool(mask, values, "mask (vs values)")
    dtype = _compute_dtype(rewards, values)
    r = torch.where(m, rewards.to(dtype), 0)
    v = torch.where(m, values.to(dtype), 0)
    T = r.shape[1]
    advantages = torch.zeros_like(r)
    next_value = torch.zeros_like(r[:, 0])
    next_adv = torch.zeros_like(r[:, 0])
    # A Python loop over T is fine: it is a handful of tiny kernels per token, done once per rollout.
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv = torch.where(m[:, t], delta + gamma * lam * next_adv, 0)
        advantages[:, t] = adv
        # A masked position hands 0 to its predecessor: that is what makes the last real token terminal.
        next_value, next_adv = v[:, t], adv
    returns = torch.where(m, advantages + v, 0)
    return advantages, returns


def _groups(scores: Tensor, group_size: int) -> Tensor:
    """``[batch]`` -> ``[batch / group_size, group_size]``: the answers to one prompt are consecutive rows."""
    if scores.dim() != 1 or group_size < 1 or scores.shape[0] % group_size:
        raise ValueError(f"scores of shape {tuple(scores.shape)} do not split into groups of {group_size}")
    return scores.to(_compute_dtype(scores)).reshape(-1, group_size)


def group_advantages(scores: Tensor, group_size: int, kind: Advantage) -> Tensor:
    """Each answer's score against the other answers to its prompt: the baseline a critic would learn,
    taken from the group instead (no value model).

    ``scores`` is ``[batch]`` with the ``group_size`` answers to a prompt in consecutive rows. With
    ``mean_g`` and ``std_g`` the group's mean and (unbiased) std:

    - ``"grpo"``: ``(s - mean_g) / (std_g + GROUP_STD_EPS)`` (Shao et al. 2024, outcome supervision).
    - ``"dr_grpo"``: ``s - mean_g``; dividing by the std up-weights prompts that are nearly always (or
      never) solved, a difficulty bias (Liu et al. 2025).
    - ``"rloo"``: ``s - mean of the other group_size - 1 answers`` = ``G / (G - 1) * (s - mean_g)``, an
      unbiased baseline since it leaves the answer's own score out (Ahmadian et al. 2024; Kool et al. 2019).
    - ``"reinforce_pp"``: ``s`` unchanged; REINFORCE++ normalises the returns over the whole batch instead
      of per group (Hu 2025), see ``critic_free_advantages``.

    Returns ``[batch]`` (float32 or wider). A group whose answers all scored the same gets 0 from every
    estimator but reinforce_pp: it carries no signal about which answer is better.
    """
    g = _groups(scores, group_size)
    if kind == "reinforce_pp":
        return g.reshape(-1)
    if group_size < 2:
        raise ValueError(f"advantage {kind!r} needs at least 2 answers per prompt, got group_size {group_size}")
    # A float mean of equal scores can miss them by an ulp, which grpo's 1 / (std + eps) would blow up to a
    # spurious push on every answer of the group (7e-5 for eight scores of 0.1): no spread, no advantage.
    same = (g == g[:, :1]).all(1, keepdim=True)
    centred = torch.where(same, 0, g - g.mean(1, keepdim=True))
    if kind == "grpo":
        out = centred / (g.std(1, keepdim=True) + GROUP_STD_EPS)
    elif kind == "dr_grpo":
        out = centred
    elif kind == "rloo":
        out = centred * (group_size / (group_size - 1))
    else:
        raise ValueError(f"unknown advantage {kind!r}; expected grpo, dr_grpo, rloo or reinforce_pp")
    return out.reshape(-1)


def group_reward_stats(scores: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """``(share of groups whose answers all scored the same, mean within-group std)`` as 0-d tensors.

    A group without spread has zero advantage under a group baseline, so the share says how much of a
    rollout trained nothing (e.g. prompts far too hard or too easy); the std is the unbiased one that GRPO
    divides by (0 for groups of one).
    """
    g = _groups(scores, group_size)
    same = (g == g[:, :1]).all(1).to(g.dtype).mean()
    std = g.std(1).mean() if group_size > 1 else g.new_zeros(())
    return same, std


def reward_to_go(rewards: Tensor, mask: Tensor) -> Tensor:
    """``G_t = sum_{s >= t} r_s`` over each row's real tokens (gamma = 1, no critic), 0 at padding.

    With the score at the last token alone, every token of an answer gets that score; with a per-token KL
    penalty, token t also pays for the KL of the tokens it led to (REINFORCE++, Hu 2025).
    """
    m = _as_bool(mask, rewards)
    r = torch.where(m, rewards.to(_compute_dtype(rewards)), 0)
    return torch.where(m, r.flip(1).cumsum(1).flip(1), 0)


def critic_free_advantages(
    scores: Tensor,
    logp: Tensor,
    ref_logp: Tensor | None,
    mask: Tensor,
    group_size: int,
    kind: Advantage,
    kl_coef: float,
    kl_kind: KLKind = "k1",
    reduce: Reduce | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token advantages without a value model, and the per-token KL estimate for logging.

    The group baseline turns each score into a sequence advantage (``group_advantages``); that advantage
    sits at the answer's last token, ``-kl_coef * kl`` at every token (``per_token_rewards``), and each
    token gets its reward-to-go. For REINFORCE++ the returns are then whitened over the whole batch (all
    ranks, with ``reduce``). Pass ``kl_coef=0`` when the KL is a loss term instead (``kl_loss``), and
    ``ref_logp=None`` when no reference pass was made: the KL is then 0.

    Returns ``(advantages, kl)``, both ``[batch, T]``, 0 at padding.
    """
    base = group_advantages(scores, group_size, kind)
    rewards, kl = per_token_rewards(base, logp, logp if ref_logp is None else ref_logp, mask, kl_coef, kl_kind)
    advantages = reward_to_go(rewards, mask)
    if kind == "reinforce_pp":
        advantages = masked_whiten(advantages, mask, reduce=reduce)
    return advantages, kl


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------


def policy_loss(
    logp_new: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float,
    aggregation: Aggregation = "token",
    budget: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate loss, averaged over real tokens (or as ``aggregation`` says, see ``aggregate``).

    ``loss = mean_t max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps))`` with
    ``ratio_t = exp(logp_new - logp_old)``: the pessimistic side of the clipped objective, so the policy
    gets no gradient for moving a token's probability further than ``eps`` in the direction its advantage
    favours.

    Args:
        logp_new: ``[batch, T]`` log-probs of the rollout tokens under the policy being trained (with grad).
        logp_old: ``[batch, T]`` log-probs recorded at rollout time (detached).
        advantages: ``[batch, T]`` (usually whitened) advantages (detached).
        mask: ``[batch, T]`` response mask.
        clip_range: epsilon; 0.2 is the usual default (Schulman et al. 2017; lm-human-preferences).
        aggregation, budget: how the per-token terms are averaged, see ``aggregate``.

    Returns:
        ``(loss, stats)``. ``loss`` is a 0-d tensor carrying the gradient. ``stats`` holds detached 0-d
        tensors, all over real tokens only:

        - ``clipfrac``: fraction of tokens where the clipped term was the larger one (so the gradient
          through that token was cut).
        - ``approx_kl``: mean k3 estimate of KL(old || new), ``(ratio - 1) - log ratio``: unbiased and
          never negative, unlike the mean of ``logp_old - logp_new``.
        - ``ratio_mean``, ``ratio_max``: of the probability ratio; a large ``ratio_max`` flags instability.
    """
    m = _as_bool(mask, logp_new)
    dtype = _compute_dtype(logp_new, logp_old, advantages)
    log_ratio = torch.where(m, logp_new.to(dtype) - logp_old.to(dtype), 0)
    ratio = torch.exp(log_ratio)
    adv = torch.where(m, advantages.to(dtype), 0)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = aggregate(torch.maximum(unclipped, clipped), m, aggregation, budget)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(dtype), m),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, m),
            "ratio_mean": masked_mean(ratio, m),
            # Ratios are positive, so the zeros at padding never win; an empty batch reports 0.
            "ratio_max": torch.where(m, ratio, 0).amax(),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def aggregate(per_token: Tensor, mask: Tensor, how: Aggregation, budget: int | None = None) -> Tensor:
    """One loss from per-token terms ``[batch, T]``; the choice decides how much a long answer weighs.

    - ``"token"``: mean over every real token of the batch (PPO here, DAPO): each token counts the same.
    - ``"sequence"``: mean over each answer's tokens, then over answers (GRPO's ``1/|o_i|``, Shao et al.
      2024): each answer counts the same, so a long wrong answer is penalised less per token than a short
      one, the length bias Liu et al. 2025 point out.
    - ``"budget"``: sum over real tokens divided by ``batch * budget`` with ``budget`` the most tokens an
      answer may have (``max_new_tokens``): a constant, so no length normalisation (Dr. GRPO, Liu et al.
      2025).

    Rows without a real token add 0 (and count as answers for ``"sequence"`` and ``"budget"``).
    """
    m = _as_bool(mask, per_token)
    if how == "token":
        return masked_mean(per_token, m)
    x = torch.where(m, per_token.to(_compute_dtype(per_token)), 0)
    if how == "sequence":
        return (x.sum(1) / m.sum(1).clamp_min(1).to(x.dtype)).mean()
    if how == "budget":
        if budget is None or budget < 1:
            raise ValueError(f"aggregation 'budget' needs the token budget of an answer (>= 1), got {budget}")
        return x.sum() / (x.shape[0] * budget)
    raise ValueError(f"unknown aggregation {how!r}; expected token, sequence or budget")


def kl_loss(
    logp_new: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    kind: KLKind = "k3",
    aggregation: Aggregation = "token",
    budget: int | None = None,
) -> Tensor:
    """KL(policy || reference) as a loss term, differentiable through ``logp_new`` (GRPO, Shao et al. 2024).

    GRPO adds ``beta * D_KL`` to the loss instead of folding it into the reward, with the k3 estimator
    ``pi_ref / pi - log(pi_ref / pi) - 1`` (unbiased and never negative, see ``kl_penalty``), averaged like
    the surrogate (``aggregate``). The tokens were sampled from the rollout policy, not the one being
    trained, so after the first minibatch the estimate is slightly off-policy, as in GRPO.
    """
    m = _as_bool(mask, logp_new)
    return aggregate(torch.where(m, kl_penalty(logp_new, ref_logp, kind), 0), m, aggregation, budget)


def value_loss(
    values_new: Tensor, values_old: Tensor, returns: Tensor, mask: Tensor, clip_range: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss: ``0.5 * mean_t max((v - R)^2, (v_clip - R)^2)`` over real tokens.

    ``v_clip = values_old + clamp(values_new - values_old, -eps, eps)``; taking the max keeps the value
    head from moving more than ``eps`` from its rollout prediction per update (Huang et al. 2024, detail
    "value function loss clipping", as in the lm-human-preferences code).

    Args:
        values_new: ``[batch, T]`` value predictions being trained (with grad).
        values_old: ``[batch, T]`` predictions recorded at rollout time (detached).
        returns: ``[batch, T]`` targets from ``gae`` (detached).
        mask: ``[batch, T]`` response mask.
        clip_range: epsilon in value units (0.2 in lm-human-preferences; scale it with your rewards).

    Returns:
        ``(loss, stats)`` with detached 0-d stats over real tokens:

        - ``vf_clipfrac``: fraction of tokens where the clipped error was the larger one.
        - ``explained_variance``: ``1 - Var(R - v_new) / Var(R)``; 1 is perfect, 0 is no better than a
          constant, negative is worse. NaN if the returns have no variance or fewer than 2 tokens.
        - ``value_mean``: mean of ``values_new``.
    """
    m = _as_bool(mask, values_new)
    dtype = _compute_dtype(values_new, values_old, returns)
    v = torch.where(m, values_new.to(dtype), 0)
    v_old = torch.where(m, values_old.to(dtype), 0)
    ret = torch.where(m, returns.to(dtype), 0)
    v_clipped = v_old + torch.clamp(v - v_old, -clip_range, clip_range)
    err = (v - ret).square()
    err_clipped = (v_clipped - ret).square()
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), m)
    with torch.no_grad():
        stats = {
            "vf_clipfrac": masked_mean((err_clipped > err).to(dtype), m),
            "explained_variance": explained_variance(v, ret, m),
            "value_mean": masked_mean(v, m),
        }
    return loss, {k: t.detach() for k, t in stats.items()}


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor, reduce: Reduce | None = None) -> Tensor:
    """``1 - Var(R - v) / Var(R)`` over real tokens, a 0-d tensor: 1 is perfect, 0 no better than a constant.

    A figure of the whole set it is given, not a mean: the returns of one short answer hardly vary, so
    averaging it over small batches reads far below (or NaN for one-token batches) the value model's
    figure over the rollout. With ``reduce`` (see ``Reduce``) the set is every rank's tokens: each rank's
    own figure, averaged, misses the spread between ranks. Biased variances (the n cancels) without the
    entry-count check of masked_whiten, so a degenerate batch gives NaN instead of raising mid-training.
    """
    m = _as_bool(mask, values)
    dtype = _compute_dtype(values, returns)
    v, ret = torch.where(m, values.to(dtype), 0), torch.where(m, returns.to(dtype), 0)
    resid = ret - v

    def summed(*parts: Tensor) -> Tensor:
        total = torch.stack([torch.where(m, x, 0).sum() for x in parts])
        return reduce(total) if reduce is not None else total

    count, ret_sum, resid_sum = summed(m.to(dtype), ret, resid)
    ret_mean, resid_mean = ret_sum / count, resid_sum / count
    var_resid, var_ret = summed((resid - resid_mean).square(), (ret - ret_mean).square())
    return 1 - var_resid / var_ret


# --------------------------------------------------------------------------------------------------
# From logits
# --------------------------------------------------------------------------------------------------




def _tempered(logits: Tensor, temperature: float) -> Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return logits if temperature == 1.0 else logits / temperature


# Not trl's entropy_from_logits: faster, but NaN at -inf logits, off by 0.1 on bf16 (bench/library_choices.py).
def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of ``softmax(logits / temperature)`` over the last dimension, in nats.

    ``H = -sum p * log p`` with ``log p = logits - logsumexp(logits)``. Entries with ``p == 0`` (e.g.
    logits masked to -inf) contribute 0 instead of ``0 * -inf = NaN``. Half-precision logits are
    upcast to float32 one row at a time and tempered after the upcast, as in ``core.generation.token_logprobs``.

    Returns:
        ``logits.shape[:-1]``, float32 or wider.
    """
    if logits.dtype not in (torch.float32, torch.float64):
        if logits.dim() < 2 or logits.shape[0] == 0:
            return entropy_from_logits(logits.float(), temperature)
        return torch.stack([entropy_from_logits(row.float(), temperature) for row in logits])
    logits = _tempered(logits, temperature)
    logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, 0).sum(-1)


# --------------------------------------------------------------------------------------------------
# KL coefficient controllers
# --------------------------------------------------------------------------------------------------


def _check_state(state: dict[str, float | str], kind: str) -> float:
    if state.get("kind") != kind:
        raise ValueError(f"KL controller state is for a {state.get('kind')!r} controller, not {kind!r}")
    return float(state["value"])


class FixedKLController:
    """A constant KL coefficient; ``update`` is a no-op so the loop can treat both controllers alike."""

    def __init__(self, coef: float):
        if coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {coef}")
        self.value = float(coef)

    def update(self, current_kl: float | Tensor, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, float | str]:
        return {"kind": "fixed", "value": self.value}

    def load_state_dict(self, state: dict[str, float | str]) -> None:
        self.value = _check_state(state, "fixed")


class AdaptiveKLController:
    """Steers the KL coefficient so the policy's KL from the reference tracks ``target`` (Ziegler et al.).

    After each rollout: ``e = clip(current_kl / target - 1, -0.2, 0.2)`` and
    ``value *= 1 + e * n_steps / horizon``. The clip bounds how fast beta moves on a noisy KL estimate.

    ``target`` is in nats per *sequence*: pass ``current_kl = kl.sum(1).mean()`` with ``kl`` the per-token
    estimate from ``per_token_rewards`` (k1 in the papers; k3 estimates the same KL), and ``n_steps`` = number of sequences in the rollout
    batch (the lm-human-preferences code; their horizon is 10000 episodes).
    """

    def __init__(self, init_coef: float, target: float, horizon: float = 10000):
        if init_coef <= 0 or target <= 0 or horizon <= 0:
            raise ValueError(
                f"adaptive KL needs init_coef, target and horizon > 0, got {init_coef}, {target}, {horizon}"
            )
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | Tensor, n_steps: int) -> float:
        """Apply one update and return the new coefficient."""
        kl = float(current_kl)
        # A NaN here would silently stick in the coefficient for the rest of training.
        if not math.isfinite(kl):
            raise ValueError(f"current_kl must be finite, got {kl}")
        proportional_error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float | str]:
        # target and horizon come from the recipe on resume; only the evolved coefficient is state.
        return {"kind": "adaptive", "value": self.value}

    def load_state_dict(self, state: dict[str, float | str]) -> None:
        self.value = _check_state(state, "adaptive")


def make_kl_controller(
    kl_coef: float, kl_target: float | None = None, horizon: float = 10000
) -> FixedKLController | AdaptiveKLController:
    """Adaptive controller starting at ``kl_coef`` when ``kl_target`` is set, otherwise a fixed one."""
    if kl_target is None:
        return FixedKLController(kl_coef)
    return AdaptiveKLController(kl_coef, kl_target, horizon)

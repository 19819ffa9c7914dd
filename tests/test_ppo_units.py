"""PPO pieces that need no model: prompt order, prompt reading, instability warnings.

The math has its own tests (tests/test_ppo_algo.py); the loop on tiny models is in tests/test_ppo_stage.py.
"""

from __future__ import annotations

import json
import logging

import pytest


def test_prompt_order_draws_every_prompt_once_per_epoch():
    from rlhf_cli.ppo.loop import PromptOrder

    order = PromptOrder(10, seed=3)
    first, second = order.take(0, 10), order.take(10, 10)
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    assert order.take(7, 6) == first[7:] + second[:3]
    assert PromptOrder(10, seed=3).take(4, 9) == order.take(4, 9)  # resumable from a position alone


def test_message_prompts_drop_a_trailing_assistant_turn(tmp_path):
    from rlhf_cli.ppo.prompts import read_prompts
    from rlhf_cli.recipe import PPORecipe

    path = tmp_path / "p.jsonl"
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path.write_text(json.dumps({"messages": chat}) + "\n" + json.dumps({"messages": chat[:1]}) + "\n")
    recipe = PPORecipe(policy={"path": "m"}, reward={"function": "a.b:c"}, data={"train": str(path)})
    assert read_prompts(recipe) == [chat[:1], chat[:1]]


def test_unstable_numbers_are_warned_about(caplog):
    from rlhf_cli.ppo.loop import State, warn_if_unstable

    state = State()
    calm = {"kl": 0.3, "ratio_max": 1.5, "ratio_mean": 1.0, "clipfrac": 0.1}
    log = logging.getLogger("rlhf")
    log.addHandler(caplog.handler)  # the CLI's logging setup stops "rlhf" records from reaching the root logger
    try:
        warn_if_unstable(calm, state, 1)
        assert not caplog.records
        warn_if_unstable({**calm, "kl": -0.4}, state, 2)
        warn_if_unstable({**calm, "ratio_max": 40.0}, state, 3)
        for it in range(4, 7):
            warn_if_unstable({**calm, "clipfrac": 0.5}, state, it)
    finally:
        log.removeHandler(caplog.handler)
    text = caplog.text
    assert "KL to the reference is negative" in text and "ratio exploded" in text and "clip fraction above 0.3" in text


def test_a_negative_kl_within_its_noise_is_not_warned(caplog):
    """The demo's PPO, iteration 3: mean sequence KL -0.067 over 16 answers of a policy barely moved from
    its reference. The k1 estimate of so few samples is negative by chance; a warning that the samples
    came from another distribution must wait for a mean below twice its standard error."""
    import torch

    from rlhf_cli.core.checks import mean_and_error
    from rlhf_cli.ppo.loop import State, warn_if_unstable

    calm = {"kl": -0.067, "ratio_max": 1.5, "ratio_mean": 1.0, "clipfrac": 0.05}
    near_zero = torch.tensor([0.4, -0.5, 0.1, -0.3, 0.2, -0.6, 0.05, -0.1, 0.3, -0.4, 0.1, -0.2, 0.15, -0.35, 0.0, 0.0])
    mean, se = mean_and_error(near_zero.tolist())
    assert (mean, se) == pytest.approx((float(near_zero.mean()), float(near_zero.std()) / 4)) and 0.05 < se < 0.1
    log = logging.getLogger("rlhf")
    log.addHandler(caplog.handler)
    try:
        warn_if_unstable(calm, State(), 3, kl_se=se)
        assert not caplog.records
        warn_if_unstable({**calm, "kl": -0.4}, State(), 4, kl_se=se)
    finally:
        log.removeHandler(caplog.handler)
    assert "mean KL to the reference is negative (-0.4 nats, " in caplog.text
    caplog.clear()
    log.addHandler(caplog.handler)
    try:  # one sample has no error: the -0.05 floor alone decides
        warn_if_unstable({**calm, "kl": -0.06}, State(), 5, kl_se=mean_and_error([-0.06])[1])
    finally:
        log.removeHandler(caplog.handler)
    assert "(-0.06 nats, inf standard errors" in caplog.text


def test_scoring_tempers_bf16_logits_after_the_fp32_upcast():
    """token_stats of bf16 logits: the log-probs and entropy of softmax(logits.float() / T), as sampled."""
    import torch

    from rlhf_cli.ppo.rollout import Rollout, token_stats

    torch.manual_seed(0)
    B, R, V, T = 2, 3, 50, 0.7
    logits = (torch.randn(B, R, V) * 6).bfloat16()
    ref = (torch.randn(B, R, V) * 6).bfloat16()
    labels = torch.randint(V, (B, R))
    ids = torch.cat([torch.ones(B, 2, dtype=torch.long), labels], 1)
    ones = torch.ones_like(ids)
    rollout = Rollout(ids, ones, ones.cumsum(1) - 1, labels, torch.ones(B, R, dtype=torch.bool),
                      torch.ones(B, dtype=torch.bool), ["", ""], 0.0)

    def actor(i, m, p, n):
        return logits, torch.zeros(B, R, dtype=torch.bfloat16)

    logp, ref_logp, _, entropy = token_stats(actor, lambda i, m, p, n: ref, rollout, T, chunk=B)
    exact = torch.log_softmax(logits.float() / T, -1)
    torch.testing.assert_close(logp, exact.gather(-1, labels[..., None])[..., 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(ref_logp, torch.log_softmax(ref.float() / T, -1).gather(-1, labels[..., None])[..., 0],
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, -(exact.exp() * exact).sum(-1), atol=1e-5, rtol=0)


def test_learning_rate_is_derived_from_what_trains():
    from rlhf_cli.recipe import PPORecipe

    def recipe(**kw):
        return PPORecipe(policy={"path": "m"}, reward={"function": "a.b:c"}, data={"train": "p.jsonl"}, **kw)

    assert recipe().ppo.lr is None
    assert recipe().learning_rate() == (1e-4, "ppo.lr unset: LoRA default (about 10x full fine-tuning's)")
    assert recipe(lora=None).learning_rate() == (1e-5, "ppo.lr unset: full fine-tuning default")
    assert recipe(ppo={"lr": 3e-5}).learning_rate() == (3e-5, "ppo.lr")
    assert recipe(lora=None, ppo={"lr": 3e-5}).learning_rate() == (3e-5, "ppo.lr")


def test_kl_estimator_is_a_recipe_choice_of_the_estimators_algo_has():
    import pytest
    import torch
    from pydantic import ValidationError

    from rlhf_cli.ppo.algo import kl_penalty
    from rlhf_cli.recipe import PPORecipe

    def recipe(kind):
        return PPORecipe(policy={"path": "m"}, reward={"function": "a.b:c"}, data={"train": "p.jsonl"},
                         ppo={"kl_estimator": kind})

    assert PPORecipe(policy={"path": "m"}, reward={"function": "a.b:c"}, data={"train": "p.jsonl"}).ppo.kl_estimator == "k1"
    d = torch.tensor([0.5])
    for kind in ("k1", "k2", "k3", "abs"):
        assert recipe(kind).ppo.kl_estimator == kind
        kl_penalty(d, torch.zeros(1), recipe(kind).ppo.kl_estimator)  # every choice is one algo computes
    with pytest.raises(ValidationError, match="kl_estimator"):
        recipe("k4")


def test_update_statistics_reduce_to_the_per_step_values_in_one_read():
    """The sync-free reduction gives what averaging each micro-step's float did, and finds the first
    non-finite loss."""
    import torch

    from rlhf_cli.ppo.loop import reduce_stats

    steps = [{"policy_loss": 0.25, "clipfrac": 0.0, "ratio_max": 1.5}, {"policy_loss": -0.75, "clipfrac": 0.5, "ratio_max": 3.0},
             {"policy_loss": 0.5, "clipfrac": 0.25, "ratio_max": 1.25}]
    sums = {k: [torch.tensor(s[k]) for s in steps] for k in steps[0]}
    old = {k: sum(s[k] for s in steps) / len(steps) for k in ("policy_loss", "clipfrac")}
    old["ratio_max"] = max(s["ratio_max"] for s in steps)
    out, bad = reduce_stats(sums, [torch.tensor(0.1), torch.tensor(0.2)])
    assert out == pytest.approx(old) and bad is None
    assert reduce_stats(sums, [torch.tensor(0.1), torch.tensor(float("nan")), torch.tensor(float("inf"))])[1] == 1


def test_update_statistics_are_over_every_process(monkeypatch):
    """Only the main process logs: its clipfrac and losses were its own micro-steps', not the run's. Two
    processes are played in turn: the first one's reduced tensors are what the second one's all_reduce meets."""
    import torch
    import torch.distributed as dist

    from rlhf_cli.core import distributed
    from rlhf_cli.ppo.loop import reduce_stats

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    sent: list[torch.Tensor] = []
    monkeypatch.setattr(dist, "all_reduce", lambda t, op: sent.append(t.clone()))
    theirs = {"policy_loss": [torch.tensor(0.5)], "clipfrac": [torch.tensor(0.25)], "ratio_max": [torch.tensor(4.0)]}
    their_weights = {"policy_loss": [torch.tensor(6.0)], "clipfrac": [torch.tensor(6.0)], "ratio_max": [torch.tensor(6.0)]}
    reduce_stats(theirs, [torch.tensor(0.1)], their_weights)
    other = iter(sent)

    def all_reduce(t, op):
        o = next(other)
        t.copy_(t + o if op == dist.ReduceOp.SUM else torch.maximum(t, o))

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    mine = {"policy_loss": [torch.tensor(0.25), torch.tensor(-0.75)], "clipfrac": [torch.tensor(0.0), torch.tensor(0.5)],
            "ratio_max": [torch.tensor(1.5), torch.tensor(3.0)]}
    w = [torch.tensor(3.0), torch.tensor(1.0)]
    out, _ = reduce_stats(mine, [torch.tensor(0.1)], {k: w for k in mine})
    # Token-weighted over both processes: 3 + 1 tokens here, 6 there.
    assert out == pytest.approx({"policy_loss": (0.75 - 0.75 + 3.0) / 10, "clipfrac": (0.5 + 1.5) / 10, "ratio_max": 4.0})


@pytest.mark.parametrize("critic", [True, False])
def test_update_statistics_are_over_the_tokens_they_were_taken_on(critic):
    """Micro-batches of 8, 1, 7 and 1 tokens: clipfrac, the losses and the value figures of an update
    are those of the whole rollout (with a learning rate of 0, the same numbers), not means of micro-batch
    means; explained_variance was NaN, each one-token micro-batch's returns having no variance."""
    import torch
    from accelerate import Accelerator
    from torch import nn

    from rlhf_cli.core.generation import token_logprobs
    from rlhf_cli.ppo import algo
    from rlhf_cli.ppo.loop import UpdateContext, ppo_update
    from rlhf_cli.ppo.method import Method
    from rlhf_cli.ppo.rollout import Rollout
    from rlhf_cli.recipe import GRPOSpec, PPOSpec

    vocab, P, R = 11, 2, 8

    class Actor(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.out, self.v = nn.Embedding(vocab, 8), nn.Linear(8, vocab), nn.Linear(8, 1)

        def policy_logits(self, ids, mask, pos, n):
            return self.out(self.emb(ids))[:, -n - 1 : -1]

        def values(self, ids, mask, pos, n):
            return self.v(self.emb(ids))[:, -n - 1 : -1].squeeze(-1)

        def forward(self, ids, mask, pos, n):
            return self.policy_logits(ids, mask, pos, n), self.values(ids, mask, pos, n) if critic else None

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    lengths = torch.tensor([8, 1, 7, 1])
    mask = torch.arange(R)[None] < lengths[:, None]
    resp = torch.where(mask, torch.randint(1, vocab, (4, R), generator=g), 0)
    ids = torch.cat([torch.randint(1, vocab, (4, P), generator=g), resp], 1)
    attn = torch.cat([torch.ones(4, P, dtype=torch.long), mask.long()], 1)
    rollout = Rollout(ids, attn, (attn.cumsum(1) - 1).clamp(min=0), resp, mask, torch.ones(4, dtype=torch.bool),
                      [""] * 4, 0.0)
    actor = Actor()
    with torch.no_grad():
        logp = token_logprobs(actor.policy_logits(ids, attn, None, R), resp)
        values = actor.values(ids, attn, None, R)
    old = logp - torch.where(torch.rand(4, R, generator=g) < 0.5, 0.5, 0.0)
    adv, ret = torch.randn(4, R, generator=g), torch.randn(4, R, generator=g)
    sizes = {"rollout_batch_size": 4, "mini_batch_size": 4, "grad_accum": 4, "ppo_epochs": 2, "lr": 1e-3}
    spec = PPOSpec(**sizes) if critic else GRPOSpec(**sizes, group_size=2)
    method = Method("ppo", spec, spec, "gae", 1, "reward", "k1") if critic else Method("grpo", spec, None, "rloo", 2, "reward", "k1")
    acc = Accelerator(gradient_accumulation_steps=4, cpu=True)
    optimizer = torch.optim.SGD(actor.parameters(), lr=0.0)
    model, optimizer = acc.prepare(actor, optimizer)
    update = UpdateContext(model, optimizer, acc, list(actor.parameters()), method, torch.Generator().manual_seed(0),
                           mini=4, micro=1, temperature=1.0, max_new_tokens=R, lr=0.0)
    batch = {"old_logp": old, "advantages": adv, **({"old_values": values, "returns": ret} if critic else {})}
    stats = ppo_update(update, rollout, batch, 1)

    loss, pg = algo.policy_loss(logp, old, adv, mask, spec.clip_range)
    expected = {"policy_loss": float(loss), **{k: float(pg[k]) for k in ("clipfrac", "approx_kl", "ratio_mean", "ratio_max")}}
    if critic:
        vloss, vf = algo.value_loss(values, values, ret, mask, spec.value_clip_range)
        expected.update(value_loss=float(vloss), **{k: float(v) for k, v in vf.items()})
    assert stats == pytest.approx(expected, rel=1e-5)


def test_a_token_mean_loss_is_the_mini_batchs_whatever_grad_accum_and_processes():
    """Micro-batch token means weighted by token_shares, averaged as accelerate (over grad_accum) and DDP
    (over processes) average them, give the token mean of the whole mini-batch; unweighted they did not."""
    import types

    import torch

    from rlhf_cli.ppo.algo import aggregate
    from rlhf_cli.ppo.loop import token_shares

    g = torch.Generator().manual_seed(0)
    lengths = [[9, 1, 1, 7, 2, 8, 1, 1], [3, 3, 12, 1, 5, 1, 1, 6]]  # two processes' rollouts, answers of T <= 12
    masks = [(torch.arange(12)[None] < torch.tensor(rank)[:, None]).float() for rank in lengths]
    terms = [torch.randn(8, 12, generator=g) for _ in lengths]
    perms = [torch.randperm(8, generator=g) for _ in lengths]
    mini, micro = 4, 2  # grad_accum 2

    def fake_acc(processes, others=()):
        return types.SimpleNamespace(num_processes=processes, reduce=lambda t, reduction: t + sum(others))

    # One process: each mini-batch step is the token mean of its 4 rows.
    shares = token_shares(masks[0].sum(1), perms[0], mini, micro, fake_acc(1))
    for j, start in enumerate(range(0, 8, mini)):
        micro_means = [aggregate(terms[0][perms[0][m:m + micro]], masks[0][perms[0][m:m + micro]], "token")
                       for m in range(start, start + mini, micro)]
        step = sum(s * x for s, x in zip(shares[2 * j:2 * j + 2], micro_means)) / (mini // micro)
        rows = perms[0][start:start + mini]
        assert step.item() == pytest.approx(aggregate(terms[0][rows], masks[0][rows], "token").item(), rel=1e-5)
        assert (sum(micro_means) / 2).item() != pytest.approx(step.item(), rel=1e-3)  # the plain mean of means

    # Two processes: DDP's average of the two ranks' steps is the token mean over both ranks' mini-batches.
    def per_mini(rank):
        t = masks[rank].sum(1)
        return torch.stack([t[perms[rank][s:s + mini]].sum() for s in range(0, 8, mini)])
    shares = [token_shares(masks[r].sum(1), perms[r], mini, micro, fake_acc(2, [per_mini(1 - r)])) for r in (0, 1)]
    for j, start in enumerate(range(0, 8, mini)):
        steps = []
        for r in (0, 1):
            means = [aggregate(terms[r][perms[r][m:m + micro]], masks[r][perms[r][m:m + micro]], "token")
                     for m in range(start, start + mini, micro)]
            steps.append(sum(s * x for s, x in zip(shares[r][2 * j:2 * j + 2], means)) / (mini // micro))
        rows = [perms[r][start:start + mini] for r in (0, 1)]
        whole = aggregate(torch.cat([terms[r][rows[r]] for r in (0, 1)]), torch.cat([masks[r][rows[r]] for r in (0, 1)]), "token")
        assert (sum(steps) / 2).item() == pytest.approx(whole.item(), rel=1e-5)


def test_the_entropy_figure_is_over_every_processs_tokens():
    """Two processes, 10 answer tokens of entropy 1 here and 2 of entropy 3 there: 16 / 12 nats, not the
    mean of the two processes' means (2.0)."""
    import types

    import torch

    from rlhf_cli.ppo.loop import _token_mean

    mask = torch.arange(6)[None] < torch.tensor([[6], [4]])
    theirs = torch.tensor([6.0, 2.0])
    acc = types.SimpleNamespace(num_processes=2, reduce=lambda t, reduction: t + theirs if reduction == "sum" else (t + theirs) / 2)
    assert _token_mean(acc, torch.where(mask, 1.0, float("nan")), mask) == pytest.approx(16 / 12)
    assert _token_mean(types.SimpleNamespace(num_processes=1), torch.full((2, 6), 2.0), mask) == pytest.approx(2.0)


def test_only_the_policy_and_value_adapters_train_on_a_model_with_a_module_named_value():
    """RWKV calls two of its projections `value`: the frozen parent and reward adapters on them stay frozen
    (the parent is active in every policy pass, so a trainable copy would learn and move the reference)."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import RwkvConfig, RwkvForCausalLM

    from rlhf_cli.ppo.roles import SharedActor, new_value_head

    torch.manual_seed(0)
    model = RwkvForCausalLM(RwkvConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
                                       intermediate_size=64))
    config = LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM")
    peft = get_peft_model(model, config, adapter_name="policy")
    for name in ("value", "parent0", "reward"):
        peft.add_adapter(name, copy.deepcopy(config))
    actor = SharedActor(peft, new_value_head(32, "cpu"), parents=["parent0"])
    actor.freeze_all_but_trainable()
    trained = {n.split(".")[-2] for n, p in peft.named_parameters() if p.requires_grad}
    assert trained == {"policy", "value"}
    assert sum(p.requires_grad for n, p in peft.named_parameters() if ".value.lora_" in n) > 0  # RWKV's own `value`

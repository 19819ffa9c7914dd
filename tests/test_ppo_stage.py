"""rlhf ppo on tiny local models: the score rises, KL stays bounded, layouts, resume, user errors.

The policy is the tiny Llama after `rlhf sft` (full fine-tuning: its answers say "it is great." about
a quarter of the time); the reward model is `rlhf train-rm --model <that sft run>` (a LoRA adapter and
score head on the fixture preferences, where chosen answers say "great"), so PPO puts it on the policy's
base. A second policy, `rlhf sft --model <sft run>` with LoRA, has an adapter of its own that PPO keeps
frozen under its new adapters, so the reward model (trained without it) still shares the one base.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from stagekit import metrics, rlhf
from typer.testing import CliRunner

from rlhf_cli.cli import app
from tests.ppo_support import rl_command, scorers

pytestmark = [pytest.mark.stage, pytest.mark.usefixtures("one_thread_module")]

# Small and fast: 16 prompts per rollout, 2 minibatches, 4 epochs, 16 new tokens.
FAST = {
    "ppo.rollout_batch_size": 16, "ppo.mini_batch_size": 8, "ppo.lr": 3e-3, "ppo.save_steps": 100,
    "generation.max_new_tokens": 16, "lora.r": 8, "lora.alpha": 16,
}


@pytest.fixture(scope="module")
def runs(tiny, rl_start, tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo")
    sft, sft_lora, rm = rl_start["sft"], root / "sft-lora", rl_start["rm"]
    done = rlhf("sft", "sft.yaml", "--model", str(sft), "--data", str(tiny["chat"]),
                "--set", f"data.eval={tiny['chat_eval']}", "--set", "train.max_steps=10", "--output-dir", str(sft_lora))
    assert done.code == 0, done
    accuracy = json.loads((rm / "run.json").read_text())["metrics"]["eval_accuracy"]
    assert accuracy >= 0.9, f"fixture reward model did not learn the preference (accuracy {accuracy})"
    scoring = scorers(rm)
    return {"sft": sft, "sft_lora": sft_lora, "rm": rm, "root": root, "scorers": scoring,
            "start": {k: sample(tiny, sft, f) for k, f in scoring.items()},
            "start_lora": {"rm": sample(tiny, sft_lora, scoring["rm"])}}


def sample(tiny, run: Path, scorer) -> float:
    """Mean score of one sampled answer to each of the 100 fixture prompts: far less noisy than one rollout."""
    from tests.ppo_support import sample_score

    return sample_score(run, tiny["prompts"], scorer)


def ppo(tiny, runs, out: Path, reward: str, iterations: int, extra: dict | None = None, resume: str | None = None,
        policy: str = "sft"):
    sets = {**FAST, "ppo.iterations": iterations, **(extra or {})}
    return rl_command("ppo", runs[policy], reward, tiny["prompts"], out, sets, resume)


def rise(tiny, runs, out: Path, kind: str, start: str = "start") -> float:
    """How much the saved policy's mean score exceeds the starting policy's (both loaded through run.json)."""
    return sample(tiny, out, runs["scorers"][kind]) - runs[start][kind]


def mean_kl(rows: list[dict]) -> float:
    """Mean sequence KL to the reference over iterations 2.. (iteration 1 samples the reference itself)."""
    return sum(r["kl"] for r in rows[1:]) / len(rows[1:])


def test_reward_model_score_rises_with_bounded_kl(tiny, runs):
    out = runs["root"] / "ppo-rm"
    result = ppo(tiny, runs, out, str(runs["rm"]), iterations=8, extra={"ppo.lr": 2e-3})
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["layout"]["name"] == "shared-base" and manifest["layout"]["base_copies"] == 1
    assert manifest["status"] == "completed" and manifest["parent_run"] == str(runs["sft"])
    rows = metrics(out)
    # The reward model scores "... it is great." about +4 and every other answer about -6: a rise of 1.5
    # is 15 more answers in 100 ending in "great" (seeds 1, 2, 42 gave 2.3-3.9; KL at most 5.5).
    assert rise(tiny, runs, out, "rm") > 1.5
    # Bounded, not exploding: the mean KL of iterations 2.. was 2.2 (PPO seed 7) and 4.6 nats per 16-token
    # answer (seed 42); the largest single iteration 2.5-5.3 for seeds 1-3 and 13.6 for seed 42, as its
    # policy settled on the rewarded answer.
    assert mean_kl(rows) < 8 and max(r["kl"] for r in rows) < 25, [r["kl"] for r in rows]
    assert_sane_metrics(rows, max_new_tokens=FAST["generation.max_new_tokens"], min_kl=0.05)


def assert_sane_metrics(rows: list[dict], max_new_tokens: int, min_kl: float) -> None:
    """Every logged number is finite and in its range, and KL starts at 0 (iteration 1 samples the reference:
    the policy adapter starts at zero) before the policy moves away from it."""
    import math

    for r in rows:
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, (int, float))), r
        assert r["entropy"] > 0 and 0 <= r["clipfrac"] <= 1 and r["approx_kl"] >= 0 and 0.5 < r["ratio_mean"] < 2, r
        assert r["value_loss"] >= 0, r
        assert 1 <= r["response_length"] <= max_new_tokens, r
        assert r["eos_fraction"] + r["truncated_fraction"] == pytest.approx(1.0), r
        assert r["tokens_per_s_generation"] > 0 and r["tokens_per_s_training"] > 0, r
    assert abs(rows[0]["kl"]) < 1e-4, rows[0]["kl"]
    assert mean_kl(rows) > min_kl, [r["kl"] for r in rows]
    # The value head starts at 0 and learns the returns: its predictions move toward the scores' scale.
    assert abs(rows[-1]["value_mean"]) > abs(rows[0]["value_mean"]), [r["value_mean"] for r in rows]


def test_large_kl_coef_keeps_policy_near_reference(tiny, runs):
    from tests.ppo_support import policy_kl

    free = runs["root"] / "ppo-free"
    held = runs["root"] / "ppo-held"
    for out, beta in ((free, 0.05), (held, 5.0)):
        result = ppo(tiny, runs, out, "tests.ppo_support:says_great", iterations=6,
                     extra={"ppo.kl_coef": beta, "ppo.lr": 1.5e-3})
        assert result.exit_code == 0, result.output
    # Seeds 1, 2, 42: free rises 0.32-0.49 with an exact KL of 1.5-2.3 nats per answer; held moves
    # -0.03..0.04 with 0.010-0.018 nats.
    free_kl, held_kl = (policy_kl(out, runs["sft"], tiny["prompts"]) for out in (free, held))
    assert rise(tiny, runs, free, "fn") > 0.15 and free_kl > 0.5
    assert abs(rise(tiny, runs, held, "fn")) < 0.1
    assert held_kl < min(0.1, 0.1 * free_kl)


def test_the_policys_lora_arithmetic_counts_every_optimizer_step(tiny, runs, monkeypatch):
    """PPO's optimizer is tracked: no cached low-precision weight cast of the policy outlives one of its steps."""
    from rlhf_cli.core.peft_patches import arithmetic_of
    from rlhf_cli.ppo import loop

    track, seen = loop.track_optimizer, []

    def spy(model, optimizer):
        steps: list[int] = []
        optimizer.register_step_post_hook(lambda *_: steps.append(1))
        seen.append((model, steps))
        track(model, optimizer)

    monkeypatch.setattr(loop, "track_optimizer", spy)
    result = ppo(tiny, runs, runs["root"] / "ppo-tracked", "tests.ppo_support:says_great", iterations=1)
    assert result.exit_code == 0, result.output
    [(actor, steps)] = seen
    assert steps and [a.optimizer_steps for a in arithmetic_of(actor)] == [len(steps)]


@pytest.fixture(scope="module")
def fn_run(tiny, runs):
    """Five iterations against the rule-based reward, uninterrupted."""
    out = runs["root"] / "ppo-fn"
    result = ppo(tiny, runs, out, "tests.ppo_support:says_great", iterations=5)
    assert result.exit_code == 0, result.output
    return out


def test_function_reward_rises(tiny, runs, fn_run):
    assert rise(tiny, runs, fn_run, "fn") > 0.15  # share of answers saying "great" (0.41 at the start)


def test_resume_continues_bit_identically(tiny, runs, fn_run, monkeypatch):

    # The same run, interrupted by SIGINT during iteration 3: it finishes that iteration, checkpoints, exits 130.
    monkeypatch.setenv("PPO_INTERRUPT_AT", "3")
    monkeypatch.setenv("PPO_CALLS", "0")
    broken = runs["root"] / "ppo-int"
    result = ppo(tiny, runs, broken, "tests.ppo_support:says_great_then_interrupt", iterations=5)
    assert result.exit_code == 130, result.output
    assert json.loads((broken / "run.json").read_text())["status"] == "interrupted"
    assert (broken / "checkpoints" / "checkpoint-3" / "COMPLETE").exists()
    assert [r["step"] for r in metrics(broken)] == [1, 2, 3]

    result = ppo(tiny, runs, broken, "tests.ppo_support:says_great_then_interrupt", iterations=5, resume="auto")
    assert result.exit_code == 0, result.output
    manifest = json.loads((broken / "run.json").read_text())
    assert manifest["resumed_from"].endswith("checkpoint-3")
    assert [r["step"] for r in metrics(broken)] == [1, 2, 3, 4, 5]
    # The prompts are fingerprinted, for a resume to tell that they changed: the same file, the same id.
    assert len(manifest["data_fingerprint"]) == 16
    assert manifest["data_fingerprint"] == json.loads((fn_run / "run.json").read_text())["data_fingerprint"]
    # Optimizer, KL controller, RNG and prompt position restored: the same weights as the uninterrupted run.
    assert (broken / "adapter" / "adapter_model.safetensors").read_bytes() == (
        fn_run / "adapter" / "adapter_model.safetensors").read_bytes()
    # The responses sampled are the whole run's, the stopped session's with the resumed one's.
    straight = json.loads((fn_run / "run.json").read_text())
    assert manifest["distributed"]["samples_per_rank"] == straight["distributed"]["samples_per_rank"]


def test_policy_adapter_loads_with_plain_peft_and_through_the_run(runs, fn_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rlhf_cli.runs import resolve_model

    out = fn_run
    resolved = resolve_model(str(out))
    assert resolved.adapters == (str(out / "adapter"),) and Path(resolved.base) == runs["sft"] / "model"
    base = AutoModelForCausalLM.from_pretrained(resolved.base)
    ids = torch.tensor([[1, 5, 9, 12, 30]])
    before = base(ids).logits
    tuned = PeftModel.from_pretrained(base, resolved.adapters[0])
    assert not torch.allclose(before, tuned(ids).logits)


def _plain_peft_values(base_dir: Path, value_dir: Path, ids, mask, pos, n_response: int):
    """V(s_t) from a saved value model read with peft and safetensors alone: adapter, trunk, head."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from rlhf_cli.ppo.roles import VALUE_HEAD_FILE, trunk

    value = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), value_dir).eval()
    head = load_file(str(value_dir / VALUE_HEAD_FILE))
    with torch.no_grad():
        hidden = trunk(value.get_base_model())(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
        return (hidden[:, -(n_response + 1) : -1] @ head["weight"].T + head["bias"]).squeeze(-1)


def test_saved_value_model_loads_with_plain_peft_and_scores_as_in_memory(tiny, runs, fn_run, tmp_path):
    """value/ is a plain peft adapter plus a scalar head: read with peft alone it gives the values the actor
    computed in memory before saving, and the trained run's head has moved from the zero it started at."""
    import torch

    from rlhf_cli.core.loading import resolve
    from rlhf_cli.ppo.build import build_models, policy_tokenizer
    from rlhf_cli.ppo.layout import plan_layout
    from rlhf_cli.recipe import PPORecipe

    ids = torch.tensor([[1, 5, 9, 12, 30, 41, 7]])
    mask, pos = torch.ones_like(ids), torch.arange(7)[None]
    # fp32 on both sides, so the comparison is of the files, not of two roundings.
    recipe = PPORecipe(policy={"path": str(runs["sft"]), "dtype": "fp32"}, reward={"function": "tests.ppo_support:says_great"},
                       lora={"r": FAST["lora.r"], "alpha": FAST["lora.alpha"]}, data={"train": str(tiny["prompts"])})
    policy = resolve(recipe.policy)
    actor = build_models(recipe, policy, plan_layout(recipe, policy, policy_tokenizer(recipe, policy))).actor
    with torch.no_grad():
        for n, p in actor.peft.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)  # policy and value adapters that differ from each other
        actor.value_head.weight.normal_()
        in_memory = actor.values(ids, mask, pos, 3)
    actor.save(tmp_path / "policy", tmp_path / "value")
    torch.testing.assert_close(_plain_peft_values(runs["sft"] / "model", tmp_path / "value", ids, mask, pos, 3), in_memory,
                               atol=1e-5, rtol=1e-4)

    trained = _plain_peft_values(runs["sft"] / "model", fn_run / "value", ids, mask, pos, 3)
    assert trained.abs().max() > 1e-3
    actor.load(fn_run / "adapter", fn_run / "value")
    with torch.no_grad():
        torch.testing.assert_close(actor.values(ids, mask, pos, 3), trained, atol=1e-5, rtol=1e-4)


def test_4bit_shared_base_with_the_sft_adapter_kept_frozen(tiny, runs):
    from rlhf_cli.runs import resolve_model

    out = runs["root"] / "ppo-4bit"
    result = ppo(tiny, runs, out, str(runs["rm"]), iterations=5, extra={"quant.bits": 4, "ppo.lr": 2e-3},
                 policy="sft_lora")
    assert result.exit_code == 0, result.output
    layout = json.loads((out / "run.json").read_text())["layout"]
    assert layout["quantized_bits"] == 4 and layout["base_copies"] == 1 and layout["parent_adapters"] == "stacked"
    assert layout["name"] == "shared-base"  # the reward run (trained without the SFT adapter) shares the base
    # The PPO adapter was trained on top of the SFT adapter: later stages apply both, in order.
    assert resolve_model(str(out)).adapters == (str(runs["sft_lora"] / "adapter"), str(out / "adapter"))
    assert rise(tiny, runs, out, "rm", start="start_lora") > 1.5
    assert mean_kl(metrics(out)) > 0.05


def _storages_used(run_role) -> dict[int, int]:
    """untyped-storage pointer -> bytes of every parameter and buffer of every module that runs in
    `run_role()`: a role computing on a second copy of the base shows up as storages of its own.

    A running module's leaf children count too: a LoRA layer calls its base weight functionally."""
    import torch

    seen: dict[int, int] = {}

    def record(module, _args):
        leaves = [c for c in module.children() if next(c.children(), None) is None]
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False),
                  *(t for c in leaves for t in [*c.parameters(), *c.buffers()])]:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        with torch.no_grad():
            run_role()
    finally:
        handle.remove()
    return seen


def _roles_storages(models) -> dict[str, dict[int, int]]:
    """The storages each role's pass reads: policy, value, reference and reward."""
    import torch

    actor = models.actor
    ids = torch.tensor([[5, 9, 12, 30, 41, 7]])
    mask, pos = torch.ones_like(ids), torch.arange(6)[None]
    return {
        "policy": _storages_used(lambda: actor.policy_logits(ids, mask, pos, 3)),
        "value": _storages_used(lambda: actor.values(ids, mask, pos, 3)),
        "reference": _storages_used(lambda: actor.reference_logits(ids, mask, pos, 3)),
        "reward": _storages_used(lambda: models.scorer(["where is the cat?"], ["the cat is in the barn."])),
    }


def _weight_bytes(module) -> dict[int, int]:
    """storage pointer -> bytes of the module's base weights and buffers (LoRA adapters left out)."""
    named = [*module.named_parameters(), *module.named_buffers()]
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for n, t in named if "lora_" not in n}


def test_shared_base_holds_one_copy_of_the_base_weights(tiny, runs):
    from rlhf_cli.core.loading import resolve
    from rlhf_cli.core.reward import load_reward_model
    from rlhf_cli.ppo.build import build_models, policy_tokenizer
    from rlhf_cli.ppo.layout import plan_layout
    from rlhf_cli.ppo.roles import trunk
    from rlhf_cli.recipe import PPORecipe

    def build(lora):
        recipe = PPORecipe(policy={"path": str(runs["sft"])}, reward={"path": str(runs["rm"])}, lora=lora,
                           data={"train": str(tiny["prompts"])})
        policy = resolve(recipe.policy)
        plan = plan_layout(recipe, policy, policy_tokenizer(recipe, policy))
        return build_models(recipe, policy, plan)

    shared = build({"r": 8})
    base = shared.actor.peft.get_base_model()
    base_weights = _weight_bytes(base)
    body_bytes = sum(_weight_bytes(trunk(base)).values())
    roles = _roles_storages(shared)
    # Every role runs the transformer body (value and reward skip the output head) ...
    assert all(sum(role.values()) >= body_bytes for role in roles.values()), {k: sum(r.values()) for k, r in roles.items()}
    # ... on the one base: besides its storages, only the shared model's adapters and heads are read.
    used = {ptr for role in roles.values() for ptr in role}
    adapters_and_heads = {t.untyped_storage().data_ptr() for t in [*shared.actor.parameters(), *shared.scorer.head.parameters()]}
    assert used <= set(base_weights) | adapters_and_heads
    assert set(base_weights) <= used

    separate = build(None)
    roles = _roles_storages(separate)
    assert separate.layout["base_copies"] == 4
    # Four roles, four copies: no storage is read by two of them.
    assert all(sum(role.values()) >= body_bytes for role in roles.values())
    assert sum({ptr: n for role in roles.values() for ptr, n in role.items()}.values()) >= 4 * body_bytes
    assert not set(roles["policy"]) & set(roles["reference"])

    # The reward adapter on the shared base scores like the reward model loaded on its own.
    prompts = ["where is the cat?", "where is the owl?"]
    responses = ["the cat is in the barn. it is great.", "the owl is in the park."]
    alone = load_reward_model(str(runs["rm"]))(prompts, responses)
    together = shared.scorer(prompts, responses)
    assert together == pytest.approx(alone, abs=0.15)
    assert together[0] - together[1] > 2


def test_a_policy_run_given_as_reward_is_a_usage_error(tiny, runs):
    out = runs["root"] / "ppo-bad-reward"
    result = ppo(tiny, runs, out, str(runs["sft"]), iterations=1)
    assert result.exit_code == 2, result.output
    assert "not a reward model" in result.output
    assert not out.exists()  # nothing half-written


def test_a_reward_function_that_cannot_be_imported_exits_2_before_the_run_starts(tiny, runs):
    out = runs["root"] / "ppo-bad-function"
    result = ppo(tiny, runs, out, "no_such_module_xyz:score", iterations=1)
    assert result.exit_code == 2, result.output
    assert "reward function no_such_module_xyz:score: cannot import no_such_module_xyz" in result.output
    assert not out.exists()  # refused before the run directory or any model


def test_prompts_too_long_for_the_context_are_a_data_error(tiny, runs):
    out = runs["root"] / "ppo-long"
    result = ppo(tiny, runs, out, "tests.ppo_support:says_great", iterations=1, extra={"data.max_prompt_length": 4})
    assert result.exit_code == 3 and "raise data.max_prompt_length" in result.output, result.output
    # The tiny model sees 256 positions; 8-token prompts leave room for 248 new tokens.
    result = ppo(tiny, runs, out, "tests.ppo_support:says_great", iterations=1, extra={"generation.max_new_tokens": 250})
    assert result.exit_code == 3 and "lower generation.max_new_tokens to 248" in result.output, result.output
    assert not out.exists()



def test_adapter_switching_matches_peft_and_trains_only_policy_and_value(tiny, runs):
    import torch

    from rlhf_cli.core.chat import conversation_text
    from rlhf_cli.core.loading import resolve
    from rlhf_cli.ppo.build import build_models, policy_tokenizer
    from rlhf_cli.ppo.layout import plan_layout
    from rlhf_cli.ppo.roles import response_logits, token_values, trunk
    from rlhf_cli.recipe import PPORecipe

    recipe = PPORecipe(policy={"path": str(runs["sft"])}, reward={"path": str(runs["rm"])}, lora={"r": 4},
                       data={"train": str(tiny["prompts"])})
    policy = resolve(recipe.policy)
    models = build_models(recipe, policy, plan_layout(recipe, policy, policy_tokenizer(recipe, policy)))
    actor = models.actor
    trainable = {n for n, p in actor.named_parameters() if p.requires_grad}
    assert trainable and all(".policy." in n or ".value." in n or n.startswith("value_head") for n in trainable)
    assert any(".policy." in n for n in trainable) and any(".value." in n for n in trainable)
    with torch.no_grad():
        for n, p in actor.peft.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)  # adapters that differ from each other and from the base
        actor.value_head.weight.normal_()
    ids = torch.tensor([[5, 9, 12, 30, 41, 7], [5, 9, 12, 30, 41, 8]])
    mask, pos = torch.ones_like(ids), torch.arange(6).expand(2, 6)
    with torch.no_grad():
        logits, values = actor(ids, mask, pos, 3)
        ref = actor.reference_logits(ids, mask, pos, 3)
        scores = models.scorer(["where is the cat?"], ["the cat is in the barn."])
        actor.peft.set_adapter("policy")  # peft's own switching, for comparison
        expected_logits = response_logits(actor.peft, ids, mask, pos, 3)
        actor.peft.set_adapter("value")
        expected_values = token_values(trunk(actor.peft.get_base_model()), actor.value_head, ids, mask, pos, 3)
        with actor.peft.disable_adapter():
            expected_ref = response_logits(actor.peft, ids, mask, pos, 3)
        # The reward adapter and score head applied with peft's own switching, pooled at the last token
        # (one unpadded sequence).
        rm_tok = models.scorer.tokenizer
        enc = rm_tok([conversation_text(rm_tok, "where is the cat?", "the cat is in the barn.")], return_tensors="pt",
                     add_special_tokens=False)
        actor.peft.set_adapter("reward")
        hidden = trunk(actor.peft.get_base_model())(**enc).last_hidden_state
        expected_score = models.scorer.head(hidden[:, -1].float())[:, 0].tolist()
    torch.testing.assert_close(logits, expected_logits)
    torch.testing.assert_close(values, expected_values)
    torch.testing.assert_close(ref, expected_ref)
    assert not torch.allclose(logits, ref)
    assert scores == pytest.approx(expected_score, abs=1e-5)


def test_a_reward_model_whose_input_format_is_unknown_is_a_usage_error(tiny, runs, tmp_path):
    """A sequence-classification model with another vocabulary and no chat template: PPO cannot know how
    to show it a conversation, so it stops before loading anything."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from rlhf_cli.demo.tiny import build_tokenizer

    tok_dir = build_tokenizer(tmp_path / "other-tok", vocab_size=300)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.chat_template = None
    rm_dir = tmp_path / "other-rm"
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    (rm_dir / "chat_template.jinja").unlink(missing_ok=True)
    out = runs["root"] / "ppo-no-template"
    result = ppo(tiny, runs, out, str(rm_dir), iterations=1)
    assert result.exit_code == 2, result.output
    assert "no chat template and another vocabulary" in result.output
    assert not out.exists()


# One optimizer step per iteration, few tokens: seconds per run.
SMALL = {"ppo.rollout_batch_size": 8, "ppo.mini_batch_size": 8, "ppo.ppo_epochs": 1, "ppo.save_steps": 1,
         "generation.max_new_tokens": 8}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_an_update_that_overflows_ends_the_run_before_its_checkpoint(tiny, sft_full_run, tmp_path):
    """lr 1e39 makes the first AdamW step overflow: no loss is computed after it, so only a check of the
    weights stops the checkpoint of iteration 1 (save_steps 1) from being marked complete."""
    out = tmp_path / "ppo-overflow"
    result = ppo(tiny, {"sft": sft_full_run}, out, "tests.ppo_support:says_great", iterations=2,
                 extra={**SMALL, "ppo.lr": 1e39})
    assert result.exit_code == 1, result.output
    assert ("error: iteration 1: the policy or value weights are not finite after the update: lower ppo.lr (now 1e+39)"
            in result.output)
    assert not list(out.glob("checkpoints/*/COMPLETE"))
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "failed" and run["error"].startswith("iteration 1: the policy or value weights are not finite")


def test_checkpoints_before_a_diverged_iteration_stay_as_they_were(tiny, sft_full_run, tmp_path, monkeypatch):
    """Iterations 1 and 2 are checkpointed; iteration 3's last optimizer step overflows (simulated): the run
    exits 1 and neither a checkpoint of infs nor the rotation (save_total_limit 2) touches the good ones."""
    import torch

    from rlhf_cli.ppo import loop

    out = tmp_path / "ppo-poisoned"
    update, before = loop.ppo_update, {}

    def overflowing(context, rollout, batch, it):
        stats = update(context, rollout, batch, it)
        if it == 3:
            before.update(_files(out / "checkpoints"))
            with torch.no_grad():
                context.params[0].fill_(float("inf"))
        return stats

    monkeypatch.setattr(loop, "ppo_update", overflowing)
    result = ppo(tiny, {"sft": sft_full_run}, out, "tests.ppo_support:says_great", iterations=4,
                 extra={**SMALL, "ppo.save_total_limit": 2})
    assert result.exit_code == 1, result.output
    assert "iteration 3: the policy or value weights are not finite" in result.output
    assert {"checkpoint-1/COMPLETE", "checkpoint-2/COMPLETE"} <= set(before)
    assert _files(out / "checkpoints") == before


@pytest.mark.parametrize("error", ["device", "host"])
def test_out_of_memory_in_ppo_is_one_line_naming_what_to_lower(tiny, sft_full_run, tmp_path, monkeypatch, error):
    import torch

    from rlhf_cli.ppo import loop

    def exhausted(*args, **kwargs):
        if error == "device":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 bytes")

    monkeypatch.setattr(loop, "sample_rollout", exhausted)
    out = tmp_path / "ppo-oom"
    result = ppo(tiny, {"sft": sft_full_run}, out, "tests.ppo_support:says_great", iterations=1, extra=SMALL)
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1] == (
        "error: out of memory in iteration 1: lower ppo.rollout_batch_size, ppo.mini_batch_size, "
        "generation.max_new_tokens or data.max_prompt_length, or load the base in 4 bits (quant.bits: 4)")
    assert json.loads((out / "run.json").read_text())["status"] == "failed"


def test_the_math_refusing_a_diverged_policy_is_one_line_and_other_errors_stay_tracebacks():
    import torch

    from rlhf_cli.errors import TrainingError
    from rlhf_cli.ppo import algo
    from rlhf_cli.ppo.loop import State, failures_explained
    from rlhf_cli.recipe import PPORecipe

    recipe = PPORecipe(policy={"path": "runs/sft"}, reward={"function": "tests.ppo_support:says_great"},
                       data={"train": "p.jsonl"})
    with pytest.raises(TrainingError, match=r"^iteration 5: current_kl must be finite, got nan: the policy diverged; "
                                            r"lower ppo.lr \(now 0.0001\) or ppo.ppo_epochs$"):
        with failures_explained(State(iteration=4), recipe):
            algo.make_kl_controller(0.05, 6.0, 10000).update(float("nan"), 8)
    with pytest.raises(TrainingError, match=r"^iteration 1: probability tensor contains"):
        with failures_explained(State(), recipe):
            torch.multinomial(torch.tensor([[float("nan"), 1.0]]), 1)
    with pytest.raises(ValueError, match="not the math"):
        with failures_explained(State(), recipe):
            raise ValueError("not the math")


def _share_changed(before: Path, after: Path) -> float:
    """Share of weights that differ between two saved full models, compared in bf16 as a bf16 run holds them."""
    from safetensors.torch import load_file

    old = {k: v for f in sorted(before.glob("*.safetensors")) for k, v in load_file(f).items()}
    new = {k: v for f in sorted(after.glob("*.safetensors")) for k, v in load_file(f).items()}
    changed = sum(int((new[k].bfloat16() != old[k].bfloat16()).sum()) for k in new)
    return changed / sum(v.numel() for v in new.values())


def test_full_fine_tune_in_bf16_trains_fp32_weights_at_the_full_default_learning_rate(tiny, runs):
    """lora: null with dtype bf16 plans precision as SFT does: fp32 weights (bf16 autocast on a GPU), so
    AdamW's 1e-5 steps are not rounded away (in bf16 weights, 6 iterations left 93% of them as they were)."""
    import torch
    from safetensors.torch import load_file

    out = runs["root"] / "ppo-full-bf16"
    sets = {k: v for k, v in FAST.items() if not k.startswith(("lora.", "ppo.lr"))}
    args = ["ppo", "--policy", str(runs["sft"]), "--reward", "tests.ppo_support:says_great", "--prompts",
            str(tiny["prompts"]), "--output-dir", str(out), "--json", "--set", "lora=null", "--set", "policy.dtype=bf16",
            "--set", "ppo.iterations=3", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["learning_rate"] == {"value": 1e-5, "why": "ppo.lr unset: full fine-tuning default"}
    assert manifest["layout"]["precision"]["weights"] == "fp32"
    assert {t.dtype for f in (out / "model").glob("*.safetensors") for t in load_file(f).values()} == {torch.float32}
    # Measured: 0.58 of the weights changed after these 3 iterations with fp32 weights, 0.07 with bf16 ones.
    assert _share_changed(runs["sft"] / "model", out / "model") > 0.4
    assert_sane_metrics(metrics(out), max_new_tokens=FAST["generation.max_new_tokens"], min_kl=1e-3)


def test_dry_run_says_which_learning_rate_and_precision(tiny, runs):
    base = ["ppo", "--policy", str(runs["sft"]), "--reward", "tests.ppo_support:says_great", "--prompts",
            str(tiny["prompts"]), "--dry-run", "--json"]
    lora = json.loads(CliRunner().invoke(app, base).stdout)["details"]
    full = json.loads(CliRunner().invoke(app, [*base, "--set", "lora=null", "--set", "policy.dtype=bf16"]).stdout)["details"]
    assert lora["learning_rate"] == {"value": 1e-4, "why": "ppo.lr unset: LoRA default (about 10x full fine-tuning's)"}
    assert full["learning_rate"] == {"value": 1e-5, "why": "ppo.lr unset: full fine-tuning default"}
    assert full["precision"]["weights"] == "fp32"


def test_kl_estimator_shapes_the_reward_and_the_reported_kl(tiny, runs, monkeypatch):
    from rlhf_cli.ppo import algo

    kinds = []
    original = algo.per_token_rewards

    def spy(*args, **kwargs):
        kinds.append(args[5] if len(args) > 5 else kwargs.get("kind", "k1"))
        return original(*args, **kwargs)

    monkeypatch.setattr(algo, "per_token_rewards", spy)
    out = runs["root"] / "ppo-k3"
    result = ppo(tiny, runs, out, "tests.ppo_support:says_great", iterations=2, extra={"ppo.kl_estimator": "k3"})
    assert result.exit_code == 0, result.output
    assert kinds == ["k3", "k3"]
    assert all(r["kl"] >= 0 for r in metrics(out))  # k3 is never negative, per token


def test_ppo_scores_with_the_reward_runs_trained_length(tiny, runs, monkeypatch):
    """The shared reward reads answers as train-rm read them: within the reward run's data.max_length (64 in
    recipes/tiny/train-rm.yaml), not the whole context; a shorter one is named before the run starts."""
    from rlhf_cli.ppo import roles

    seen = []
    original = roles.SharedReward.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen.append(self.max_length)

    monkeypatch.setattr(roles.SharedReward, "__init__", spy)
    base = ["ppo", "--policy", str(runs["sft"]), "--reward", str(runs["rm"]), "--prompts", str(tiny["prompts"]), "--json"]
    dry = CliRunner().invoke(app, [*base, "--dry-run", "--set", "generation.max_new_tokens=60"])
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.stdout)["details"]["reward_max_length"] == 64
    assert "trained on transcripts of up to 64 tokens" in dry.stderr
    out = runs["root"] / "ppo-reward-length"
    result = CliRunner().invoke(app, [*base, "--output-dir", str(out), "--set", "ppo.iterations=1",
                                      *[a for k, v in FAST.items() for a in ("--set", f"{k}={v}")]])
    assert result.exit_code == 0, result.output
    assert seen == [64]


def test_ppo_logs_every_iteration_to_tensorboard_in_the_run(tiny, runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = runs["root"] / "ppo-tb"
    result = ppo(tiny, runs, out, "tests.ppo_support:says_great", iterations=2,
                 extra={**SMALL, "ppo.report_to": "[tensorboard]"})
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"score_mean", "kl", "value_loss", "value_mean", "policy_loss"} <= set(events.Tags()["scalars"])
    assert [e.value for e in events.Scalars("kl")] == pytest.approx([r["kl"] for r in metrics(out)])

def test_the_reward_run_is_never_the_output_dir_even_with_overwrite(tiny, sft_full_run, reward_run, tmp_path):
    """`rlhf ppo --reward runs/rm -o runs/rm --overwrite` would clear the reward model it is about to load."""
    import shutil

    rm = tmp_path / "rm"
    shutil.copytree(reward_run, rm)
    before = _files(rm)
    result = CliRunner().invoke(app, ["ppo", "--policy", str(sft_full_run), "--reward", str(rm), "--prompts",
                                      str(tiny["prompts"]), "--output-dir", str(rm), "--overwrite",
                                      *[a for k, v in SMALL.items() for a in ("--set", f"{k}={v}")]])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == f"error: {rm} is an input of this ppo run: choose another --output-dir"
    assert _files(rm) == before

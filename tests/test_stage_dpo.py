"""rlhf dpo on the tiny local Llama: held-out implicit-reward accuracy rises, the reference is the SFT
model (LoRA, QLoRA with the parent adapter kept, full fine-tune), resume continues at the saved step,
and recipe and data errors exit before anything is written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from stagekit import manifest, metrics, rlhf, runner, train_losses, workdir  # noqa: F401

from rlhf_cli.cli import app

pytestmark = [pytest.mark.stage, pytest.mark.usefixtures("workdir")]


def _pairs(path, n: int | None = None) -> list[dict]:
    return [json.loads(line) for line in open(path)][:n]


def _dry_run_on(path: Path, rows: list[dict], *args: str):
    """`rlhf dpo --dry-run` of the tiny model on `rows` alone (written to `path`, no eval split)."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rlhf("dpo", "dpo.yaml", "--model", ".assets/tiny/model", "--data", str(path), "--set", "data.eval=null",
                "--set", "data.eval_fraction=0", *args, "--dry-run")


def test_dpo_raises_held_out_preference_accuracy_and_feeds_generate(tiny):
    assert rlhf("sft", "sft.yaml", "--set", "train.max_steps=20").code == 0
    out = rlhf("dpo", "dpo.yaml", "--set", "train.max_steps=20", "--set", "train.logging_steps=1")
    assert out.code == 0, out
    steps = [m for m in metrics("runs/tiny/dpo") if "loss" in m]
    # Step 1 is scored before any update: policy == reference, every implicit reward 0, loss log 2.
    first = steps[0]
    assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert first["rewards/margins"] == 0 and first["rewards/accuracies"] == 0
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert all(key in m for m in steps), key
    assert steps[-1]["loss"] < first["loss"] - 0.1
    m = out.json["metrics"]
    assert m["eval_accuracy"] >= 0.9 and m["eval_margin"] > 0, m  # chance is 0.5, the start 0 (all ties)
    assert m["eval_rewards/chosen"] > m["eval_rewards/rejected"]

    run = manifest("runs/tiny/dpo")
    assert run["status"] == "completed" and run["model"]["kind"] == "adapter"
    assert run["parent_adapters"] == "merged" and run["parent_run"].endswith("runs/tiny/sft")
    assert "<|assistant|>" in run["chat_template"]
    assert not Path("runs/tiny/dpo/adapter/ref").exists()  # trl's frozen reference copy is not saved

    from rlhf_cli.runs import resolve_model

    assert [a.split("/")[-2] for a in resolve_model("runs/tiny/dpo").adapters] == ["sft", "dpo"]
    result = runner.invoke(app, ["generate", "runs/tiny/dpo", "--prompt", "where is the cat?", "--greedy",
                                 "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[0])["prompt"] == "where is the cat?"

    # rlhf eval computes the same held-out implicit-reward accuracy, against the SFT run it started from.
    result = runner.invoke(app, ["eval", "--model", "runs/tiny/dpo", "--metric", "dpo_accuracy",
                                 "--preference", ".assets/tiny/preference_eval.jsonl", "--fail-under", "dpo_accuracy=0.9"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got["metrics"]["dpo_accuracy"] == pytest.approx(m["eval_accuracy"], abs=0.02)
    assert got["metrics"]["dpo_margin"] == pytest.approx(m["eval_margin"], rel=0.05)
    assert got["details"]["dpo_reference"].endswith("runs/tiny/sft") and got["details"]["dpo_pairs"] == 50


def _answer_log_probs(model, pairs: list[dict]) -> torch.Tensor:
    """Summed log-probs of the chosen and rejected answers, computed directly (no trl)."""
    out = []
    for key in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            ids = torch.tensor([p["prompt_ids"] + p[key]])
            with torch.no_grad():
                logits = model(input_ids=ids).logits.float()[0, :-1]
            logps = logits.log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
            out.append(logps[len(p["prompt_ids"]) - 1 :].sum())
    return torch.stack(out)


def _load(base: str, adapter: str | None, bits: int | None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rlhf_cli.core.loading import bnb_config
    from rlhf_cli.recipe import QuantSpec

    kwargs = {"dtype": torch.float32}
    if bits:
        # The 4-bit base as the run quantized it (NF4, double quantization): the SFT model at that precision.
        kwargs.update(quantization_config=bnb_config(QuantSpec(bits=bits), torch.float32), device_map={"": "cpu"})
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    if bits:
        from rlhf_cli.core.lora import keep_4bit_weights_trainable

        # With the kernel a training run's 4-bit layers use (trl's reference pass included): the inference
        # kernel bitsandbytes picks on AVX512-BF16 CPUs rounds differently, by up to 6e-3 on these sums.
        keep_4bit_weights_trainable(model)
    return (PeftModel.from_pretrained(model, adapter) if adapter else model).eval()


@pytest.mark.parametrize(
    ("parent", "sets", "reference"),
    [
        ("lora_run", [], "frozen copy of the starting adapter"),  # SFT adapter merged, a new LoRA on top
        ("qlora_run", ["quant.bits=4"], "frozen copy of the starting adapter"),  # SFT adapter kept on a 4-bit base
        ("lora_run", ["lora=null", "train.lr=1e-3"], "frozen copy of the model"),  # full fine-tune
    ],
)
def test_reference_is_the_sft_model_not_its_base(tiny, monkeypatch, request, parent, sets, reference):
    from rlhf_cli.core import dpo as dpo_trl
    from rlhf_cli.core.loading import load_tokenizer
    from rlhf_cli.runs import resolve_model

    sft = request.getfixturevalue(parent)
    resolved = resolve_model(str(sft))
    pairs, _ = dpo_trl.pair_samples(load_tokenizer(resolved), _pairs(tiny["preference_eval"], 4), 64)
    # The reference log-probs trl trains against, read once training is over (before trl's copy is dropped).
    seen = {}
    finish = dpo_trl.trained_policy

    def read_reference(trainer):
        seen["ref"] = torch.cat(dpo_trl.reference_log_probs(trainer, pairs)).float()
        seen["policy"] = trainer.model
        return finish(trainer)

    monkeypatch.setattr(dpo_trl, "trained_policy", read_reference)
    out = rlhf("dpo", "dpo.yaml", "--model", str(sft), "--set", "model.dtype=fp32", "--set", "train.max_steps=3",
               *[arg for s in sets for arg in ("--set", s)])
    assert out.code == 0, out
    assert manifest("runs/tiny/dpo")["reference"] == reference

    ref = seen["ref"]
    bits = 4 if "quant.bits=4" in sets else None
    (adapter,) = resolved.adapters
    sft_own = _answer_log_probs(_load(resolved.base, adapter, bits), pairs)
    base_own = _answer_log_probs(_load(resolved.base, None, bits), pairs)
    assert torch.allclose(ref, sft_own, atol=2e-3), (ref, sft_own)
    assert (ref - base_own).abs().max() > 0.1  # the raw base would be told apart
    # After training the policy has moved away from the reference it trained against.
    policy = _answer_log_probs(seen["policy"].eval(), pairs)
    assert (policy - sft_own).abs().max() > 1e-3


def test_interrupt_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(lora_run, monkeypatch):
    common = ["--model", str(lora_run), "--set", "train.max_steps=6", "--set", "train.logging_steps=1",
              "--set", "train.save_steps=100"]
    # The new adapter's random A matrices come from torch's global generator: start both runs alike, as
    # two fresh processes would.
    torch.manual_seed(0)
    assert rlhf("dpo", "dpo.yaml", *common, "-o", "runs/straight").code == 0
    monkeypatch.setenv("RLHF_TEST_INTERRUPT_AT_STEP", "3")
    torch.manual_seed(0)
    out = rlhf("dpo", "dpo.yaml", *common)
    assert out.code == 130, out
    assert "--resume auto" in out.stderr
    assert manifest("runs/tiny/dpo")["status"] == "interrupted"
    assert (Path("runs/tiny/dpo/checkpoints/checkpoint-3") / "COMPLETE").exists()

    monkeypatch.delenv("RLHF_TEST_INTERRUPT_AT_STEP")
    out = rlhf("dpo", "dpo.yaml", *common)
    assert out.code == 0, out
    run = manifest("runs/tiny/dpo")
    assert run["status"] == "completed" and run["resumed_from_step"] == 3
    resumed, straight = train_losses("runs/tiny/dpo"), train_losses("runs/straight")
    assert [s for s, _ in resumed] == list(range(1, 7))
    assert [loss for _, loss in resumed] == pytest.approx([loss for _, loss in straight], rel=1e-4)
    state = json.loads((Path("runs/tiny/dpo/checkpoints/checkpoint-6") / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    # trl's running token count went on from the checkpoint's (it restarted from 0 at step 4)
    tokens = [[m["num_tokens"] for m in metrics(run) if "num_tokens" in m and "loss" in m]
              for run in ("runs/tiny/dpo", "runs/straight")]
    assert len(tokens[0]) == 6 and tokens[0] == tokens[1] and tokens[0] == sorted(set(tokens[0]))


def test_dry_run_reads_message_lists_with_an_implicit_prompt_and_counts_truncation(tmp_path):
    def pair(question: str) -> dict:
        user = {"role": "user", "content": question}
        return {"chosen": [user, {"role": "assistant", "content": "the cat is in the barn. it is great."}],
                "rejected": [user, {"role": "assistant", "content": "the cat is in the barn."}]}

    # The long prompts would fill data.max_length alone: their start is cut, counted, and the answers kept whole.
    rows = [pair("where is the cat? " * 8)] * 3 + [pair("where is the cat?")] * 5
    out = _dry_run_on(tmp_path / "msgs.jsonl", rows, "--set", "data.max_length=40")
    assert out.code == 0, out
    d = out.json["details"]
    assert out.json["status"] == "dry-run" and not Path("runs").exists()
    assert d["format"] == "preference" and d["train"]["samples"] == 8
    assert d["train"]["truncated"] == 3 and d["train"]["dropped"] == 0
    assert d["train"]["length_percentiles"]["p100"] > 40
    # What both message lists share is the prompt; the answers start after the generation prompt.
    # (the first sample is a long one: its prompt keeps its end)
    assert d["sample_prompt"].endswith("where is the cat? <|end|><|assistant|>") and "<|user|>" not in d["sample_prompt"]
    assert d["sample_chosen"] == "the cat is in the barn. it is great.<|end|>"
    assert 0 < d["trainable_params"] < d["total_params"] and d["memory_estimate"]["total_gib"] > 0

    full = rlhf("dpo", "dpo.yaml", "--model", ".assets/tiny/model", "--set", "lora=null", "--dry-run")
    assert full.code == 0, full
    assert "reference_weights" in full.json["details"]["memory_estimate"]["parts_gib"]
    assert "reference_weights" not in d["memory_estimate"]["parts_gib"]  # LoRA: the reference is the adapter's copy


def test_dry_run_estimate_counts_both_answers_and_turns_checkpointing_on_when_it_does_not_fit(monkeypatch):
    import rlhf_cli.core.plan as plan

    def dry(*sets: str) -> dict:
        out = rlhf("dpo", "dpo.yaml", "--model", ".assets/tiny/model", *(a for s in sets for a in ("--set", s)), "--dry-run")
        assert out.code == 0, out
        return out.json["details"]

    monkeypatch.setattr(plan, "available_memory_bytes", lambda: 2**40)
    roomy = dry("train.batch_size=4")
    longest = min(64, roomy["train"]["length_percentiles"]["p100"])
    assert roomy["memory_estimate"]["tokens_per_step"] == 2 * 4 * longest  # chosen and rejected of 4 pairs
    assert dry("train.batch_size=8")["memory_estimate"]["tokens_per_step"] == 2 * 8 * longest
    assert roomy["gradient_checkpointing"] is False
    # The framework's fixed 0.5 GiB alone is more than three quarters of 0.5 GiB.
    monkeypatch.setattr(plan, "available_memory_bytes", lambda: 2**29)
    tight = dry("train.batch_size=4")
    assert tight["gradient_checkpointing"] is True and tight["memory_estimate"]["checkpointing"] is True
    assert dry("train.batch_size=4", "train.gradient_checkpointing=false")["gradient_checkpointing"] is False


def test_renamed_string_prompts_are_rendered_with_the_chat_template(tmp_path):
    rows = [{"question": "where is the dog?", "chosen": "the dog is in the park. it is great.",
             "rejected": "the dog is in the park. it is bad."}] * 4
    out = _dry_run_on(tmp_path / "q.jsonl", rows, "--set", "data.fields={question: prompt}")
    assert out.code == 0, out
    d = out.json["details"]
    assert d["sample_prompt"] == "<|user|>where is the dog?<|end|><|assistant|>"
    assert d["sample_chosen"] == "the dog is in the park. it is great.<|end|>"
    assert d["train"]["truncated"] == 0 and d["train"]["dropped"] == 0


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["dpo.betta=0.2"], "dpo.betta: unknown key; did you mean dpo.beta?"),
        (["dpo.loss=kto"], "dpo.loss"),
        (["dpo.label_smoothing=0.1"], "set dpo.loss: robust, or dpo.label_smoothing: 0"),
        (["lora=null", "quant.bits=4"], "add a lora block or set quant.bits: null"),
    ],
)
def test_recipe_errors_exit_2_before_anything_is_written(sets, message):
    out = rlhf("dpo", "dpo.yaml", *[arg for s in sets for arg in ("--set", s)])
    assert out.code == 2, out
    assert message in out.stderr
    assert not Path("runs").exists()


@pytest.mark.parametrize(
    ("sets", "first_loss"),
    [
        # At step 1 policy == reference, so each loss sits at its value for a zero margin:
        (["dpo.loss=hinge"], 1.0),  # relu(1 - 0)
        (["dpo.loss=ipo"], 25.0),  # (0 - 1 / (2 beta))^2 with beta 0.1 (Azar et al. 2023, eq. 17)
        (["dpo.loss=robust", "dpo.label_smoothing=0.1", "dpo.precompute_ref=true"], math.log(2)),
    ],
)
def test_each_loss_reaches_trl_and_starts_at_its_zero_margin_value(lora_run, sets, first_loss):
    out = rlhf("dpo", "dpo.yaml", "--model", str(lora_run), "--set", "train.max_steps=2", "--set", "train.logging_steps=1",
               *[arg for s in sets for arg in ("--set", s)])
    assert out.code == 0, out
    assert train_losses("runs/tiny/dpo")[0] == (1, pytest.approx(first_loss, rel=1e-4))
    precomputed = "dpo.precompute_ref=true" in sets
    assert (manifest("runs/tiny/dpo")["reference"] == "precomputed") == precomputed


def test_greedy_answers_beat_the_sft_model_under_the_reward_model(tiny, sft_full_run, reward_run):
    """The issue's end-to-end claim: greedy answers of the DPO run win against the SFT run's, judged by a
    Bradley-Terry reward model trained on the same kind of pairs (held-out prompts)."""
    out = rlhf("dpo", "dpo.yaml", "--model", str(sft_full_run), "--set", "train.max_steps=30")
    assert out.code == 0, out
    result = rlhf("eval", None, "--model", "runs/tiny/dpo", "--reference", str(sft_full_run), "--reward", str(reward_run),
                  "--metric", "win_rate", "--metric", "reward", "--prompts", str(tiny["prompts_eval"]),
                  "--set", "generation={max_new_tokens: 16, temperature: 0.0}")
    assert result.code == 0, result
    m = result.json["metrics"]
    assert m["win_rate"] >= 0.8 and m["reward"] > m["reference_reward"], m  # 0.5 would be no better than SFT


def test_long_pairs_lose_the_start_of_their_prompt_not_their_answers(tiny):
    from transformers import AutoTokenizer

    from rlhf_cli.core.chat import ensure_chat_template
    from rlhf_cli.core.dpo import pair_samples

    tok = AutoTokenizer.from_pretrained(tiny["model"])
    ensure_chat_template(tok)
    record = {"prompt": "the red cat sees the dog in the park. " * 6 + "where is the cat?",
              "chosen": "the cat is in the barn. it is great.", "rejected": "the cat is in the barn."}
    (whole,), _ = pair_samples(tok, [record], max_length=10_000)
    (cut,), stats = pair_samples(tok, [record], max_length=40)
    assert stats.truncated == 1 and stats.dropped == 0
    assert cut["chosen_ids"] == whole["chosen_ids"] and cut["rejected_ids"] == whole["rejected_ids"]
    assert cut["prompt_ids"] == whole["prompt_ids"][-len(cut["prompt_ids"]):]  # the prompt's end: the question
    assert len(cut["prompt_ids"]) + len(cut["chosen_ids"]) == 40


def test_hh_transcripts_become_prompt_turns_and_last_answers(tiny):
    from transformers import AutoTokenizer

    from rlhf_cli.core.chat import ensure_chat_template
    from rlhf_cli.core.dpo import pair_samples

    tok = AutoTokenizer.from_pretrained(tiny["model"])
    ensure_chat_template(tok)
    record = {"chosen": "\n\nHuman: where is the cat?\n\nAssistant: it is great.",
              "rejected": "\n\nHuman: where is the cat?\n\nAssistant: no."}
    (pair,), _ = pair_samples(tok, [record], max_length=200)
    assert tok.decode(pair["prompt_ids"]) == "<|user|>where is the cat?<|end|><|assistant|>"
    assert tok.decode(pair["chosen_ids"]).startswith("it is great.")


def test_held_out_figures_are_means_over_pairs_not_over_batches(tiny, tmp_path):
    """5 held-out pairs in batches of 4: each pair counts once in eval_rewards/* (trl's mean of batch means
    counted the fifth pair four times), token figures weigh each batch by its answer tokens, and the loss
    was already a mean over pairs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_cli.core import dpo
    from rlhf_cli.core.chat import ensure_chat_template
    from rlhf_cli.core.device import Precision
    from rlhf_cli.recipe import DPOSpec, DPOTrainSpec

    tok = AutoTokenizer.from_pretrained(tiny["model"])
    ensure_chat_template(tok)
    pairs, _ = dpo.pair_samples(tok, _pairs(tiny["preference_eval"], 5), 64)
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(tiny["model"])
    reference = AutoModelForCausalLM.from_pretrained(tiny["model"]).requires_grad_(False).eval()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a policy that differs from its reference
    args = dpo.dpo_args(DPOTrainSpec(batch_size=4, max_steps=1), DPOSpec(beta=0.1), tmp_path,
                        precision=Precision(torch.float32, None, "fp32"), has_eval=True, checkpointing=False, max_length=64)
    trainer = dpo.dpo_trainer(policy, args, tok, pairs, pairs, ref_model=reference)
    got = trainer.evaluate()

    batch = trainer._prepare_inputs(trainer.data_collator(pairs))
    mask = batch["completion_mask"]
    with torch.no_grad():
        ref_c, ref_r = trainer.compute_ref_log_probs(reference, batch)
        out = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                     labels=batch["input_ids"].masked_fill(mask == 0, -100), fused_lm_head=True)
    chosen, rejected = out.log_probs.sum(1).chunk(2)
    r_c, r_r = 0.1 * (chosen - ref_c), 0.1 * (rejected - ref_r)
    margins = r_c - r_r
    assert 0 < (margins > 0).sum() < 5  # the figures below can tell a pair-weighted mean from a batch-weighted one
    assert got["eval_rewards/accuracies"] == pytest.approx((margins > 0).float().mean().item(), abs=1e-6)
    assert got["eval_rewards/margins"] == pytest.approx(margins.mean().item(), abs=1e-6)
    assert got["eval_rewards/chosen"] == pytest.approx(r_c.mean().item(), abs=1e-6)
    assert got["eval_logps/rejected"] == pytest.approx(rejected.mean().item(), rel=1e-5)
    assert got["eval_loss"] == pytest.approx(-torch.nn.functional.logsigmoid(margins).mean().item(), rel=1e-5)
    shifted = mask[:, 1:].bool()
    entropy = out.entropy[shifted].mean().item()
    assert got["eval_entropy"] == pytest.approx(entropy, rel=1e-5)


def test_a_kept_parent_adapter_on_a_4bit_base_starts_equal_to_its_reference(tiny, tmp_path):
    """trl copies the starting adapter into its frozen "ref" in fp32, then rounds the trainable one to bf16 on
    a quantized model: the policy must start from the unrounded weights, the reference's."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from rlhf_cli.core import dpo
    from rlhf_cli.core.chat import ensure_chat_template
    from rlhf_cli.core.device import Precision
    from rlhf_cli.recipe import DPOSpec, DPOTrainSpec

    tok = AutoTokenizer.from_pretrained(tiny["model"])
    ensure_chat_template(tok)
    pairs, _ = dpo.pair_samples(tok, _pairs(tiny["preference_eval"], 4), 64)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.uint8)
    model = AutoModelForCausalLM.from_pretrained(tiny["model"], quantization_config=quant, device_map={"": "cpu"},
                                                 dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)  # a parent's trained adapter, not a fresh one
            if p.requires_grad:
                p.data = p.data.float()
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = dpo.dpo_args(DPOTrainSpec(batch_size=4, max_steps=1), DPOSpec(beta=0.1), tmp_path,
                        precision=Precision(torch.bfloat16, None, "bf16"), has_eval=False, checkpointing=False, max_length=64)
    trainer = dpo.dpo_trainer(model, args, tok, pairs, [])
    params = dict(trainer.model.named_parameters())
    for name, before in start.items():
        assert params[name].dtype == torch.float32
        assert torch.equal(params[name], before), name
        assert torch.equal(params[name.replace(".default.", ".ref.")], before), name

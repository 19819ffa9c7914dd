"""rlhf sft on the tiny local Llama: LoRA, full fine-tune, QLoRA on the CPU, interrupt + resume, errors."""

from __future__ import annotations

import json
from pathlib import Path

import fixtures_runs
import pytest
import torch
from stagekit import manifest, metrics, rlhf, train_losses, workdir  # noqa: F401

pytestmark = [pytest.mark.stage, pytest.mark.usefixtures("workdir")]
tiny_chatml = fixtures_runs.tiny_chatml


@pytest.fixture
def trained_models(monkeypatch):
    """The in-memory model each stage run saves (to compare weights with the base)."""
    from rlhf_cli.core import artifacts

    seen = []
    save = artifacts.save_outputs

    def keep(run_path, model, tokenizer, **kw):
        seen.append(model)
        return save(run_path, model, tokenizer, **kw)

    monkeypatch.setattr(artifacts, "save_outputs", keep)
    return seen


def _base_state(tiny) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(Path(tiny["model"]) / "model.safetensors")


def test_lora_sft_learns_and_leaves_the_base_alone(tiny, trained_models):
    out = rlhf("sft", "sft.yaml", "--set", "train.max_steps=30")
    assert out.code == 0, out
    losses = train_losses("runs/tiny/sft")
    assert losses[0][0] == 1 and losses[-1][0] == 30
    assert losses[-1][1] < losses[0][1] - 0.5, losses
    assert out.json["metrics"]["eval_perplexity"] < 300  # uniform over 384 tokens would be 384

    run = manifest("runs/tiny/sft")
    assert run["status"] == "completed" and run["model"]["kind"] == "adapter"
    # dtype auto: a bf16 frozen base where the CPU multiplies bf16 fast (AMX here), fp32 elsewhere; adapters fp32.
    from rlhf_cli.core.device import resolve_dtype

    assert run["precision"]["weights"] == ("bf16" if resolve_dtype("auto") == torch.bfloat16 else "fp32")
    from safetensors.torch import load_file

    saved = load_file(Path("runs/tiny/sft/adapter") / "adapter_model.safetensors")
    assert saved and all(t.dtype == torch.float32 for t in saved.values())
    assert 0 < run["trainable_params"] < run["total_params"]
    assert run["data"]["samples"] == 400 and run["data"]["truncated"] == 0
    assert run["metrics"]["train_tokens_per_s"] > 0
    assert "<|assistant|>" in run["chat_template"]
    # Trainer's optimizer is tracked: the eval passes' cached weight casts follow each of its 30 steps.
    from rlhf_cli.core.peft_patches import arithmetic_of

    assert [a.optimizer_steps for a in arithmetic_of(trained_models[-1])] == [30]
    assert (Path("runs/tiny/sft/tokenizer") / "chat_template.jinja").read_text() == run["chat_template"]

    model = trained_models[-1]
    base = _base_state(tiny)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.requires_grad for p in lora_b)
    assert any(p.abs().max() > 0 for p in lora_b), "LoRA B starts at zero and must have moved"
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert not p.requires_grad, name
        assert torch.equal(p.detach().float().cpu(), base[key].to(p.dtype).float()), f"{name} changed"


def test_full_finetune_changes_the_base(tiny, trained_models):
    out = rlhf("sft", "sft.yaml", "--set", "lora=null", "--set", "train.max_steps=4", "--set", "train.lr=1e-3")
    assert out.code == 0, out
    run = manifest("runs/tiny/sft")
    assert run["model"]["kind"] == "full" and run["trainable_params"] == run["total_params"]
    assert run["precision"]["weights"] == "fp32"  # fp32 master weights, half-precision autocast
    from safetensors.torch import load_file

    saved = load_file("runs/tiny/sft/model/model.safetensors")
    base = _base_state(tiny)
    changed = [k for k in base if not torch.equal(saved[k].float(), base[k].float())]
    assert len(changed) >= len(base) - 1, changed  # every matrix moved


def test_qlora_trains_4bit_on_cpu_and_keeps_a_parent_adapter(tiny, trained_models):
    assert rlhf("sft", "sft.yaml", "--set", "train.max_steps=15", "-o", "runs/lora").code == 0
    parent_last = train_losses("runs/lora")[-1][1]

    # On a 4-bit base the parent's adapter cannot be merged exactly: it keeps training instead.
    out = rlhf("sft", "sft.yaml", "--model", "runs/lora", "--set", "quant.bits=4", "--set", "train.max_steps=6",
               "--set", "train.logging_steps=1", "--set", "train.lr=1e-3")
    assert out.code == 0, out
    run = manifest("runs/tiny/sft")
    assert run["quantization"]["bits"] == 4 and run["model"]["kind"] == "adapter"
    assert run["parent_adapters"] == "kept" and run["parent_run"].endswith("runs/lora")
    assert run["base_model"]["path"] == str(Path(tiny["model"]).resolve())  # not the parent: no double count
    kinds = {type(m).__name__ for m in trained_models[-1].modules()}
    assert "Linear4bit" in kinds, kinds
    losses = [loss for _, loss in train_losses("runs/tiny/sft")]
    assert all(loss == loss for loss in losses)  # no NaN
    # It starts where the parent stopped (4-bit rounding aside), far below a fresh adapter's ~6.0.
    assert losses[0] == pytest.approx(parent_last, abs=0.15), (losses, parent_last)
    assert min(losses[-3:]) < losses[0], losses

    from rlhf_cli.runs import resolve_model

    assert [a.split("/")[-2] for a in resolve_model("runs/tiny/sft").adapters] == ["sft"]


def test_interrupt_saves_a_checkpoint_and_resume_continues_there(monkeypatch):
    import time

    from rlhf_cli.core import trainer as fitting

    common = ["--set", "train.max_steps=8", "--set", "train.logging_steps=1", "--set", "train.save_steps=100"]
    monkeypatch.setenv("RLHF_TEST_INTERRUPT_AT_STEP", "3")
    step_end = fitting.RunCallback.on_step_end

    def slow_step(self, *args, **kwargs):  # the first session's steps take 1 s, half of it CPU work
        start = time.process_time()
        while time.process_time() - start < 0.5:
            pass
        time.sleep(0.5)
        return step_end(self, *args, **kwargs)

    monkeypatch.setattr(fitting.RunCallback, "on_step_end", slow_step)
    out = rlhf("sft", "sft.yaml", *common)
    monkeypatch.setattr(fitting.RunCallback, "on_step_end", step_end)
    assert out.code == 130, out
    assert "--resume auto" in out.stderr
    run = manifest("runs/tiny/sft")
    assert run["status"] == "interrupted"
    listed = json.loads((Path("runs/tiny/sft/checkpoints/checkpoint-3") / "COMPLETE").read_text())["files"]
    assert {"optimizer.pt", "adapter_model.safetensors", "trainer_state.json"} <= set(listed)  # sizes, checked on resume
    assert [s for s, _ in train_losses("runs/tiny/sft")] == [1, 2, 3]

    monkeypatch.delenv("RLHF_TEST_INTERRUPT_AT_STEP")
    out = rlhf("sft", "sft.yaml", *common)
    assert out.code == 0, out
    run = manifest("runs/tiny/sft")
    assert run["status"] == "completed" and run["resumed_from_step"] == 3
    # The run's training time, both sessions: the second alone took well under the first's 3 s.
    assert run["train_runtime_s"] >= 3.0 and run["train_cpu_s"] >= 1.5, run
    assert [s for s, _ in train_losses("runs/tiny/sft")] == list(range(1, 9))
    state = json.loads((Path("runs/tiny/sft/checkpoints/checkpoint-8") / "trainer_state.json").read_text())
    assert state["global_step"] == 8


def test_sigterm_while_the_model_loads_marks_the_run_interrupted_and_exits_130():
    """SIGTERM outside the training loop (here while the model loads, the run directory claimed) stops the
    real process as Ctrl-C does: run.json says interrupted and the exit is 130."""
    import os
    import subprocess
    import sys

    script = (
        "import os, signal\n"
        "from rlhf_cli.core import loading\n"
        "load = loading.load_model\n"
        "def load_model(*args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return load(*args, **kwargs)\n"
        "loading.load_model = load_model\n"
        "from rlhf_cli.cli import main\n"
        "main()\n"
    )
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("RLHF_DEBUG", None)
    done = subprocess.run([sys.executable, "-c", script, "sft", str(repo / "recipes/tiny/sft.yaml"), "-o", "runs/term"],
                          env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 130, (done.returncode, done.stderr[-2000:])
    assert "error: interrupted" in done.stderr
    assert manifest("runs/term")["status"] == "interrupted"


def test_a_run_interrupted_on_its_last_step_resumes_to_the_straight_runs_result(monkeypatch):
    """Stopped on the last step (its evaluation done, its checkpoint saved), the resumed run trains nothing
    more: Trainer would have skipped the six steps' batches and trained a seventh. It reports the straight
    run's figures, the evaluation of the interrupted session included, and no trace of the interruption."""
    common = ["--set", "train.max_steps=6", "--set", "train.logging_steps=1", "--set", "train.save_steps=100",
              "--set", "train.eval_steps=3", "--set", "train.lr_scheduler=constant"]
    assert rlhf("sft", "sft.yaml", *common, "--output-dir", "runs/straight").code == 0
    monkeypatch.setenv("RLHF_TEST_INTERRUPT_AT_STEP", "6")
    assert rlhf("sft", "sft.yaml", *common).code == 130
    monkeypatch.delenv("RLHF_TEST_INTERRUPT_AT_STEP")
    out = rlhf("sft", "sft.yaml", *common)
    assert out.code == 0, out

    straight, resumed = manifest("runs/straight"), manifest("runs/tiny/sft")
    assert resumed["resumed_from_step"] == 6 and resumed["metrics"]["steps"] == 6
    for key in ("train_loss", "eval_loss", "eval_perplexity"):
        assert resumed["metrics"][key] == pytest.approx(straight["metrics"][key], rel=1e-6), key
    assert sorted(p.name for p in Path("runs/tiny/sft/checkpoints").iterdir()) == ["checkpoint-6"]
    assert "error" not in resumed and "checkpoint" not in resumed  # the interrupted session's fields are gone
    from safetensors.torch import load_file

    a, b = (load_file(f"{run}/adapter/adapter_model.safetensors") for run in ("runs/straight", "runs/tiny/sft"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_from_an_earlier_checkpoint_drops_the_continuation_it_replaces(monkeypatch):
    """Interrupted at 6, resumed from checkpoint-4 and interrupted at 5: --resume auto continues at 5, not at
    the abandoned checkpoint-6, and the metrics are one unbroken curve."""
    common = ["--set", "train.max_steps=8", "--set", "train.save_steps=2", "--set", "train.logging_steps=1",
              "--set", "data.eval=null", "--set", "data.eval_fraction=0"]
    monkeypatch.setenv("RLHF_TEST_INTERRUPT_AT_STEP", "6")
    assert rlhf("sft", "sft.yaml", *common).code == 130
    monkeypatch.setenv("RLHF_TEST_INTERRUPT_AT_STEP", "5")
    assert rlhf("sft", "sft.yaml", *common, "--resume", "runs/tiny/sft/checkpoints/checkpoint-4").code == 130
    assert sorted(p.name for p in Path("runs/tiny/sft/checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-5"]
    monkeypatch.delenv("RLHF_TEST_INTERRUPT_AT_STEP")
    out = rlhf("sft", "sft.yaml", *common)
    assert out.code == 0, out
    assert manifest("runs/tiny/sft")["resumed_from_step"] == 5
    assert [s for s, _ in train_losses("runs/tiny/sft")] == list(range(1, 9))


def test_an_overwrite_that_diverges_leaves_the_completed_run_as_it_was():
    """A failing command leaves what existed before: --overwrite with an lr that makes the loss NaN exits 1,
    and the completed run is there again, file for file."""
    import hashlib

    def content() -> dict[str, str]:
        return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path("runs/tiny/sft").rglob("*"))
                if p.is_file() and p.name != ".lock"}

    short = ["--set", "train.max_steps=3", "--set", "train.save_steps=2", "--set", "data.eval=null"]
    assert rlhf("sft", "sft.yaml", *short).code == 0
    before = content()
    out = rlhf("sft", "sft.yaml", *short, "--overwrite", "--set", "train.lr=1e30", "--set", "train.logging_steps=1")
    assert out.code == 1 and "nan" in out.stderr.lower(), out
    assert content() == before and manifest("runs/tiny/sft")["status"] == "completed"
    from rlhf_cli.runs import resolve_model

    assert resolve_model("runs/tiny/sft").adapters  # a run other stages can load, adapter files checked


def test_resume_on_data_changed_since_the_interrupt_is_refused(monkeypatch, tiny):
    # The checkpoint and the batches resume skips belong to the records the run started with.
    chat = Path("chat.jsonl")
    chat.write_text(Path(tiny["chat"]).read_text())
    common = ["--set", "train.max_steps=6", "--set", "train.save_steps=100", "--set", "data.eval=null",
              "--set", "data.train=chat.jsonl"]
    monkeypatch.setenv("RLHF_TEST_INTERRUPT_AT_STEP", "2")
    assert rlhf("sft", "sft.yaml", *common).code == 130
    monkeypatch.delenv("RLHF_TEST_INTERRUPT_AT_STEP")
    original = chat.read_text()
    chat.write_text("".join(original.splitlines(keepends=True)[1:]))  # one record fewer

    out = rlhf("sft", "sft.yaml", *common)
    assert out.code == 2, out
    assert out.stderr.strip().splitlines()[-1].startswith("error: runs/tiny/sft: the data changed since this run started")
    assert manifest("runs/tiny/sft")["status"] == "interrupted"
    chat.write_text(original)
    out = rlhf("sft", "sft.yaml", *common)
    assert out.code == 0, out
    assert manifest("runs/tiny/sft")["resumed_from_step"] == 2


def test_dry_run_shows_the_plan_and_writes_nothing():
    out = rlhf("sft", "sft.yaml", "--dry-run")
    assert out.code == 0, out
    d = out.json["details"]
    assert out.json["status"] == "dry-run" and not Path("runs").exists()
    assert d["train"]["samples"] == 400 and d["train"]["truncated"] == 0
    assert set(d["train"]["length_percentiles"]) == {"p50", "p90", "p99", "p100"}
    # Only the answer is trained: it sits in brackets after the assistant marker.
    assert d["sample"].startswith("<|user|>where is the ") and "<|assistant|>[the " in d["sample"]
    assert d["sample"].endswith("<|end|>]")
    assert 0 < d["trainable_params"] < d["total_params"]
    assert d["memory_estimate"]["total_gib"] > 0


def test_the_memory_estimate_counts_a_padding_free_batch_by_its_samples_tokens(tiny):
    # A padding-free batch holds its samples' tokens, not batch_size copies of the longest sample: with one
    # long chat among short ones, the batch that holds it is that chat and 15 short ones.
    long_answer = " ".join(["the cat is in the house."] * 6)
    chats = Path(tiny["chat"]).read_text() + json.dumps(
        {"messages": [{"role": "user", "content": "where is the cat?"}, {"role": "assistant", "content": long_answer}]}) + "\n"
    Path("chat.jsonl").write_text(chats)
    free, padded = (rlhf("sft", "sft.yaml", "--set", "data.train=chat.jsonl", "--set", f"data.padding_free={v}",
                         "--dry-run").json["details"] for v in ("true", "false"))
    batch, lengths = 16, free["train"]["length_percentiles"]
    assert padded["memory_estimate"]["tokens_per_step"] == batch * lengths["p100"]
    assert lengths["p100"] > lengths["p99"]
    assert free["memory_estimate"]["tokens_per_step"] <= lengths["p100"] + (batch - 1) * lengths["p99"]


def test_dry_run_counts_truncation_of_prompt_completion_data(tmp_path):
    rows = [{"prompt": "where is the cat? " * 8, "completion": "the cat is in the barn."}] * 3
    rows += [{"prompt": "where is the dog?", "completion": "the dog is in the park."}] * 5
    path = tmp_path / "pc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = rlhf("sft", "sft.yaml", "--data", str(path), "--set", "data.eval=null", "--set", "data.eval_fraction=0",
               "--set", "data.max_length=24", "--dry-run")
    assert out.code == 0, out
    d = out.json["details"]
    assert d["format"] == "prompt_completion"
    # The long prompts would leave no answer token within 24 tokens: their start is cut instead, counted,
    # and every answer is trained on whole.
    assert d["train"]["truncated"] == 3 and d["train"]["dropped"] == 0 and d["train"]["samples"] == 8
    assert d["sample"].endswith("[the cat is in the barn.<|end|>]") and "where is the cat?" in d["sample"]
    assert d["train"]["length_percentiles"]["p100"] > 24


def test_malformed_jsonl_is_exit_3_with_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": []}\n{"messages": [}\n')
    out = rlhf("sft", "sft.yaml", "--data", str(path))
    assert out.code == 3, out
    assert f"{path}:2:" in out.stderr
    assert not Path("runs").exists()


def test_conversations_without_an_assistant_turn_say_so_not_raise_max_length(tmp_path):
    path = tmp_path / "no-answer.jsonl"
    path.write_text('{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}\n' * 3)
    out = rlhf("sft", "sft.yaml", "--data", str(path), "--set", "data.eval=null", "--dry-run")
    assert out.code == 3, out
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: {path}: no record has an assistant turn (role: assistant), the answer SFT learns; add one to each "
        "conversation, or train on raw text with rlhf pretrain")


def test_conversations_skipped_for_want_of_an_assistant_turn_are_named_in_a_warning(tiny, tmp_path):
    rows = [json.loads(line) for line in Path(tiny["chat"]).read_text().splitlines()[:10]]
    for row in rows[:3]:
        row["messages"] = row["messages"][:1]
    path = tmp_path / "some-unanswered.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = rlhf("sft", "sft.yaml", "--data", str(path), "--set", "data.eval=null", "--set", "data.eval_fraction=0",
               "--dry-run")
    assert out.code == 0, out
    assert out.json["details"]["train"]["dropped"] == 3 and out.json["details"]["train"]["samples"] == 7
    assert "3 of 10 samples have no answer token to learn" in out.stderr


def test_missing_columns_is_exit_3_listing_them(tmp_path):
    path = tmp_path / "cols.jsonl"
    path.write_text('{"question": "a", "answer": "b"}\n')
    out = rlhf("sft", "sft.yaml", "--data", str(path))
    assert out.code == 3, out
    assert "answer, question" in out.stderr and "prompt+completion" in out.stderr and "data.fields" in out.stderr


def test_nan_loss_stops_with_exit_1(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoTokenizer.from_pretrained(tiny["model"]).save_pretrained(tmp_path / "broken")
    model = AutoModelForCausalLM.from_pretrained(tiny["model"])
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "broken")
    out = rlhf("sft", "sft.yaml", "--model", str(tmp_path / "broken"), "--set", "train.max_steps=3",
               "--set", "train.logging_steps=1")
    assert out.code == 1, out
    assert "loss is nan at step 1" in out.stderr
    run = manifest("runs/tiny/sft")
    assert run["status"] == "failed" and "nan" in run["error"]


def test_missing_tracker_is_a_recipe_error_before_anything_is_written():
    import importlib.util

    if importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    out = rlhf("sft", "sft.yaml", "--set", "train.report_to=[wandb]")
    assert out.code == 2, out
    assert "pip install wandb" in out.stderr and not Path("runs").exists()


def _checkpoint_files(run: Path) -> dict[str, bytes]:
    root = run / "checkpoints"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_divergence_ends_the_run_before_a_poisoned_checkpoint_and_keeps_the_last_finite_one(monkeypatch):
    """lr 1e30 after a warm-up step at lr 0: step 1 is checkpointed (interrupted there), step 2 moves the LoRA
    B matrices by 5e29 and step 3's loss is NaN. Resumed, the run must stop at step 3 (logged or not),
    before it saves (save_steps 3) and save_total_limit 1 rotates checkpoint-1 out for one full of NaNs."""
    from safetensors.torch import load_file

    run = Path("runs/tiny/sft")
    common = ["--set", "train.lr=1e30", "--set", "train.lr_scheduler=constant_with_warmup", "--set", "train.warmup_ratio=0.2",
              "--set", "train.max_steps=8", "--set", "train.save_steps=3", "--set", "train.logging_steps=5",
              "--set", "train.save_total_limit=1", "--set", "data.eval=null"]
    monkeypatch.setenv("RLHF_TEST_INTERRUPT_AT_STEP", "1")
    assert rlhf("sft", "sft.yaml", *common).code == 130
    before = _checkpoint_files(run)
    assert "checkpoint-1/COMPLETE" in before

    monkeypatch.delenv("RLHF_TEST_INTERRUPT_AT_STEP")
    out = rlhf("sft", "sft.yaml", *common)
    assert out.code == 1, out
    error = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert error == [error[-1]] and "loss is nan at step 3" in error[0] and "lower train.lr (now 1e+30)" in error[0], out.stderr
    assert manifest(run)["status"] == "failed" and "step 3" in manifest(run)["error"]
    assert _checkpoint_files(run) == before
    for marker in (run / "checkpoints").glob("checkpoint-*/COMPLETE"):
        weights = load_file(marker.parent / "adapter_model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values()), marker.parent.name


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 bytes")])
def test_out_of_memory_on_the_device_or_the_host_is_one_line_naming_what_to_lower(monkeypatch, error):
    from transformers import Trainer

    def exhausted(*args, **kwargs):
        raise error

    monkeypatch.setattr(Trainer, "training_step", exhausted)
    out = rlhf("sft", "sft.yaml", "--set", "train.max_steps=2")
    assert out.code == 1, out
    assert out.stderr.strip().splitlines()[-1] == (
        "error: out of memory at step 0: lower train.batch_size or data.max_length, set train.gradient_checkpointing: "
        "true, or load the base in 4 bits (quant.bits: 4)")
    assert manifest("runs/tiny/sft")["status"] == "failed"


def test_the_same_recipe_trains_the_same_adapter_whatever_ran_before():
    """New LoRA weights are drawn from train.seed, not from the process's RNG state (a long-lived process,
    or each rank of several, has drawn other numbers before)."""
    from safetensors.torch import load_file

    common = ["--set", "train.max_steps=2", "--set", "train.save_steps=100"]
    assert rlhf("sft", "sft.yaml", "-o", "runs/a", *common).code == 0
    torch.rand(12345)  # whatever else the process did in between
    assert rlhf("sft", "sft.yaml", "-o", "runs/b", *common).code == 0
    a, b = (load_file(f"runs/{n}/adapter/adapter_model.safetensors") for n in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_held_out_evaluation_reports_its_progress():
    # A held-out set of minutes' work printed nothing until it ended; it now counts its batches.
    out = rlhf("sft", "sft.yaml", "--set", "train.max_steps=2", "--set", "train.batch_size=2")
    assert out.code == 0, out
    counts = [line.split("sft eval batch ")[1].split(" ")[0] for line in out.stderr.splitlines() if "sft eval batch" in line]
    done, total = counts[-1].split("/")
    assert int(total) > 1 and done == total  # every batch of the held-out set, counted to the end


def test_a_run_over_a_parent_trained_again_is_refused_where_it_is_loaded(tiny):
    # runs/b's adapter was trained over runs/a's; once runs/a is trained again, runs/b on top of it was never trained.
    common = ["--set", "train.max_steps=2", "--set", "train.save_steps=100", "--set", "data.eval=null"]
    assert rlhf("sft", "sft.yaml", "-o", "runs/a", *common).code == 0
    assert rlhf("sft", "sft.yaml", "--model", "runs/a", "-o", "runs/b", *common).code == 0
    assert manifest("runs/b")["inputs"] == {str(Path("runs/a").resolve()): manifest("runs/a")["run_id"]}
    from stagekit import app, runner

    def generate():
        return runner.invoke(app, ["generate", "runs/b", "--prompts", str(tiny["prompts_eval"]), "--max-new-tokens", "2"])

    assert generate().exit_code == 0

    assert rlhf("sft", "sft.yaml", "-o", "runs/a", "--overwrite", *common, "--set", "train.seed=1").code == 0
    out = generate()
    assert out.exit_code == 3, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: runs/b: trained on top of {Path('runs/a').resolve()}, which was trained again since: its adapter no "
        "longer fits the model beneath it; train runs/b again, or give another run")


def test_the_held_out_loss_is_the_mean_over_its_label_tokens(tiny_chatml, tmp_path):
    # Padding-free eval batches are one row each, and Trainer averaged their losses unweighted: a token of a
    # short batch weighed more. eval_loss is now the token-weighted NLL `rlhf eval --metric perplexity` computes.
    import math

    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from rlhf_cli.core.batches import FlatCollator, chat_samples
    from rlhf_cli.core.metrics import perplexity
    from rlhf_cli.core.trainer import CausalTrainer

    tok = AutoTokenizer.from_pretrained(tiny_chatml["tokenizer"])
    model = AutoModelForCausalLM.from_pretrained(tiny_chatml["model"])
    records = [json.loads(line) for line in Path(tiny_chatml["chat_eval"]).read_text().splitlines()[:9]]
    records[8] = {"messages": [{"role": "user", "content": "where is the cat?"},
                               {"role": "assistant", "content": " ".join(["the cat is in the barn. it is great."] * 6)}]}
    samples, _ = chat_samples(tok, records, "messages", 512)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_eval_batch_size=4, use_cpu=True, report_to=[])
    trainer = CausalTrainer(model=model, args=args, eval_dataset=samples, data_collator=FlatCollator())
    loss = trainer.evaluate()["eval_loss"]
    token_weighted = perplexity(model, tok, records, "messages", max_length=512, batch_size=4)
    assert loss == pytest.approx(token_weighted.nll, rel=1e-5)
    batch_means = [perplexity(model, tok, records[i:i + 4], "messages", max_length=512, batch_size=4).nll
                   for i in range(0, 9, 4)]
    assert not math.isclose(loss, sum(batch_means) / len(batch_means), rel_tol=1e-5)  # what it was


def test_an_old_checkpoint_goes_only_once_the_new_one_is_marked_complete(monkeypatch):
    """save_total_limit 1 and a process that dies after checkpoint-4 is written but before its COMPLETE
    marker: checkpoint-2 is still there, and --resume auto continues from it to the end."""
    from rlhf_cli.core import trainer as fitting
    from rlhf_cli.runs import latest_checkpoint

    marked = []
    real = fitting.mark_complete

    def dies_at_the_second(folder):
        marked.append(Path(folder).name)
        if len(marked) == 2:
            raise RuntimeError("killed")
        real(folder)

    monkeypatch.setattr(fitting, "mark_complete", dies_at_the_second)
    common = ["--set", "train.max_steps=6", "--set", "train.save_steps=2", "--set", "train.save_total_limit=1",
              "--set", "data.eval=null"]
    with pytest.raises(RuntimeError, match="killed"):
        rlhf("sft", "sft.yaml", *common)
    run = Path("runs/tiny/sft")
    assert marked == ["checkpoint-2", "checkpoint-4"]
    assert latest_checkpoint(run) == run / "checkpoints" / "checkpoint-2"

    monkeypatch.setattr(fitting, "mark_complete", real)
    out = rlhf("sft", "sft.yaml", *common, "--resume", "auto")
    assert out.code == 0, out
    assert manifest(run)["resumed_from_step"] == 2 and out.json["metrics"]["steps"] == 6
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-6"]


def test_a_run_interrupted_on_an_epochs_last_step_still_evaluates_that_epoch(monkeypatch):
    """Two epochs of 3 steps, held-out eval at each epoch's end, interrupted on step 3: the resumed run
    starts epoch 2, so the epoch-1 eval was never made (metrics.jsonl had step 6's only)."""
    def evals(run):
        return [(m["step"], round(m["eval_loss"], 6)) for m in metrics(run) if "eval_loss" in m]

    common = ["--set", "train.max_steps=null", "--set", "train.epochs=2", "--set", "data.max_samples=48",
              "--set", "train.save_steps=100"]
    assert rlhf("sft", "sft.yaml", *common, "--output-dir", "runs/straight").code == 0
    monkeypatch.setenv("RLHF_TEST_INTERRUPT_AT_STEP", "3")
    assert rlhf("sft", "sft.yaml", *common).code == 130
    monkeypatch.delenv("RLHF_TEST_INTERRUPT_AT_STEP")
    assert rlhf("sft", "sft.yaml", *common, "--resume", "auto").code == 0
    straight = evals("runs/straight")
    assert [step for step, _ in straight] == [3, 6]
    assert evals("runs/tiny/sft") == straight


@pytest.mark.parametrize("padding_free", ["true", "false"])
def test_tokens_seen_counts_the_samples_tokens_not_padding(tiny, padding_free):
    # One epoch over chats of different lengths: every sample is read once, so the tokens trained on are
    # the data's tokens, whether the batches are flattened or padded to their longest sample.
    rows = [json.loads(line) for line in Path(tiny["chat"]).read_text().splitlines()[:7]]
    rows.append({"messages": [{"role": "user", "content": "where is the cat?"},
                              {"role": "assistant", "content": "the cat is in the house. " * 4}]})
    Path("chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = rlhf("sft", "sft.yaml", "--data", "chats.jsonl", "--set", "data.eval=null", "--set", "data.eval_fraction=0",
               "--set", "train.max_steps=null", "--set", "train.epochs=1", "--set", "train.batch_size=4",
               "--set", f"data.padding_free={padding_free}", "--output-dir", "runs/tokens")
    assert out.code == 0, out
    m = manifest(Path("runs/tokens"))
    assert m["data"]["samples"] == 8 and m["metrics"]["steps"] == 2
    assert m["tokens_seen"] == m["data"]["tokens"]


def test_the_answers_first_word_is_trained_after_a_generation_prompt_ending_in_a_space(tiny):
    # "Assistant: " + "the cat ...": byte-level BPE makes " the" one token, which starts on the prompt's space.
    from transformers import AutoTokenizer

    from rlhf_cli.core.chat import render_conversation

    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\\n' }}"
        "{% else %}{{ 'Assistant: ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
    )
    answer = "the cat is in the garden"
    messages = [{"role": "user", "content": "where is the cat?"}, {"role": "assistant", "content": answer}]
    rendered = render_conversation(tok, messages, 1000)
    trained = [t for t, label in zip(rendered.input_ids, rendered.labels) if label != -100]
    assert tok.decode(trained) == " " + answer + tok.eos_token
    assert "User" not in tok.decode(trained) and "Assistant" not in tok.decode(trained)


def test_a_conversation_opening_with_an_answer_trains_the_answer_and_not_what_the_template_puts_before_it(tiny_chatml):
    from transformers import AutoTokenizer

    from rlhf_cli.core.chat import render_conversation

    tok = AutoTokenizer.from_pretrained(tiny_chatml["tokenizer"])
    messages = [{"role": "assistant", "content": "hello there"}, {"role": "user", "content": "where is the cat?"},
                {"role": "assistant", "content": "the cat is in the garden"}]
    rendered = render_conversation(tok, messages, 1000)
    trained = tok.decode([t for t, label in zip(rendered.input_ids, rendered.labels) if label != -100])
    # Both answers with their end of turn; not the BOS, the template's default system turn or a role marker.
    assert trained == "hello there<|im_end|>\nthe cat is in the garden<|im_end|>\n"


def test_tokens_per_second_leaves_out_the_evaluations_run_during_training(monkeypatch):
    import time

    from rlhf_cli.core.trainer import CausalTrainer

    evaluation_loop = CausalTrainer.evaluation_loop

    def slow(self, *args, **kwargs):
        time.sleep(1.0)
        return evaluation_loop(self, *args, **kwargs)

    monkeypatch.setattr(CausalTrainer, "evaluation_loop", slow)
    out = rlhf("sft", "sft.yaml", "--set", "train.max_steps=4", "--set", "train.eval_steps=2",
               "--set", "train.batch_size=4", "--output-dir", "runs/speed")
    assert out.code == 0, out
    m = manifest(Path("runs/speed"))
    evaluations_during_training = 2  # after steps 2 and 4, each over a second
    training_s = m["tokens_seen"] / m["metrics"]["train_tokens_per_s"]
    assert training_s <= m["train_runtime_s"] - evaluations_during_training * 1.0


def test_a_prompt_given_as_messages_is_context_even_where_it_holds_an_earlier_answer(tiny):
    # prompt/completion trains the completion alone: an assistant turn inside the prompt is context, for
    # training and for the held-out perplexity alike.
    from transformers import AutoTokenizer

    from rlhf_cli.core.batches import chat_samples
    from rlhf_cli.core.metrics import encode_for_perplexity

    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    record = {"prompt": [{"role": "user", "content": "where is the cat?"},
                         {"role": "assistant", "content": "the cat is in the barn."},
                         {"role": "user", "content": "and the dog?"}],
              "completion": "the dog is in the park."}
    samples, stats = chat_samples(tok, [record], "prompt_completion", 1000)
    ids, labels = samples[0]["input_ids"], samples[0]["labels"]
    assert tok.decode([t for t, label in zip(ids, labels) if label != -100]) == "the dog is in the park.<|end|>"
    assert stats.loss_tokens == len(tok("the dog is in the park.<|end|>", add_special_tokens=False)["input_ids"])
    assert encode_for_perplexity(tok, record, "prompt_completion", 1000)[1] == labels

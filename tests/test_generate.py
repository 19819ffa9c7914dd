"""rlhf generate: JSONL on stdout, stdin prompts, seeds, chat template, LoRA / QLoRA runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fixtures_runs
import pytest
from fixtures_runs import of_family
from typer.testing import CliRunner

from rlhf_cli.cli import app

# Stage tests run on each tokenizer family (fixtures_runs.FAMILY_FIXTURES).
family, tiny_chatml, chatml_sft_run = fixtures_runs.family, fixtures_runs.tiny_chatml, fixtures_runs.chatml_sft_run
pytestmark = pytest.mark.stage
runner = CliRunner()
KEYS = {"index", "sample", "prompt", "response", "finish_reason", "prompt_tokens", "completion_tokens"}


def _lines(stdout: str) -> list[dict]:
    records = [json.loads(line) for line in stdout.splitlines()]
    assert records and all(set(r) == KEYS for r in records)
    return records


def _invoke(args: list[str], **kwargs):
    result = runner.invoke(app, ["generate", *args], **kwargs)
    assert result.exit_code == 0, result.stderr
    return _lines(result.stdout)


def test_stdin_same_seed_byte_identical(sft_full_run):
    """`echo PROMPT | rlhf generate RUN --prompts - --seed 1` twice, in fresh processes: identical bytes."""
    cmd = [sys.executable, "-m", "rlhf_cli", "generate", str(sft_full_run), "--prompts", "-", "--seed", "1",
           "--temperature", "1.2", "-n", "3", "--max-new-tokens", "16"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # Two fresh processes, side by side.
    procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) for _ in range(2)]
    (out, err), (out2, _) = [p.communicate(b"where is the cat?\n", timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], err.decode()
    assert out == out2
    records = _lines(out.decode())
    assert [(r["index"], r["sample"]) for r in records] == [(0, 0), (0, 1), (0, 2)]
    assert all(r["prompt"] == "where is the cat?" and r["prompt_tokens"] > 0 for r in records)
    assert len({r["response"] for r in records}) > 1  # sampled, not greedy
    assert b"generate sample 3/3" in err  # progress goes to stderr, stdout holds JSONL only
    # Another seed, another sample set.
    other = _invoke([str(sft_full_run), "--prompts", "-", "--seed", "2", "--temperature", "1.2", "-n", "3",
                     "--max-new-tokens", "16"], input="where is the cat?\n")
    assert [r["response"] for r in other] != [r["response"] for r in records]


def test_generate_into_a_pipe_whose_reader_has_gone_stops_quietly_with_0(sft_full_run, tmp_path):
    """`rlhf generate RUN --prompts p.jsonl | head -1`: once the reader has gone, generate stops, reports no
    error and exits 0, so a pipeline under `set -o pipefail` does not fail for having read what it wanted."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"where is the cat {i}?"}) + "\n" for i in range(4)))
    cmd = [sys.executable, "-m", "rlhf_cli", "generate", str(sft_full_run), "--prompts", str(prompts),
           "--max-new-tokens", "8"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(cmd, stdout=write_end, stderr=subprocess.PIPE, text=True, env=env, timeout=300)
    finally:
        os.close(write_end)
    assert proc.returncode == 0, proc.stderr
    assert not [line for line in proc.stderr.splitlines() if "error" in line.lower() or "Exception" in line], proc.stderr


def test_chat_template_from_run_and_raw(family, request, tmp_path):
    tiny, sft_full_run = of_family(request, family, "assets"), of_family(request, family, "sft")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(tiny["chat_eval"].read_text().splitlines()[0] + "\n" + json.dumps({"prompt": "where is the fox?"}) + "\n")
    chat = _invoke([str(sft_full_run), "--prompts", str(prompts), "--greedy", "--max-new-tokens", "20"])
    # The conversation's own answer is dropped; the model (trained with this template) answers in kind.
    assert isinstance(chat[0]["prompt"], list) and [m["role"] for m in chat[0]["prompt"]] == ["user"]
    assert all(r["response"].startswith("the ") and r["finish_reason"] == "eos" for r in chat)
    raw = _invoke([str(sft_full_run), "--prompt", "where is the fox?", "--raw", "--greedy", "--max-new-tokens", "20"])
    assert raw[0]["prompt_tokens"] < chat[1]["prompt_tokens"] and raw[0]["response"] != chat[1]["response"]
    # Raw text is encoded as pretraining encodes it: with the BOS the tokenizer puts in front (chatml's <|bos|>).
    from transformers import AutoTokenizer

    from rlhf_cli.core.chat import prompt_text
    from rlhf_cli.core.generation import encode_prompts

    tok = AutoTokenizer.from_pretrained(sft_full_run / "tokenizer")
    trained = tok("where is the fox?", add_special_tokens=True)["input_ids"]
    assert raw[0]["prompt_tokens"] == len(trained)
    assert encode_prompts(tok, [prompt_text(tok, "where is the fox?", raw=True)])["input_ids"][0].tolist() == trained
    assert prompt_text(tok, prompt_text(tok, "where is the fox?", raw=True), raw=True) == prompt_text(tok, "where is the fox?", raw=True)


def test_lora_run_live_adapter_equals_merge(lora_chain_run):
    args = [str(lora_chain_run), "-p", "where is the cat?", "-p", "where is the big dog?", "--greedy",
            "--max-new-tokens", "8", "--set", "model.dtype=fp32"]
    live = _invoke(args)
    merged = _invoke([*args, "--merge"])
    assert [r["response"] for r in live] == [r["response"] for r in merged]


def test_qlora_run_loads_on_4bit_base(qlora_run):
    import bitsandbytes as bnb
    from peft import PeftModel

    from rlhf_cli.core.inference import load_causal_lm
    from rlhf_cli.recipe import ModelSpec
    from rlhf_cli.runs import resolve_model

    loaded = load_causal_lm(ModelSpec(path=str(qlora_run)), merge=False)
    assert isinstance(loaded.model, PeftModel) and loaded.quant.bits == 4
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in loaded.model.modules())
    args = ["-p", "where is the cat?", "--greedy", "--max-new-tokens", "8"]
    out = _invoke([str(qlora_run), *args])
    # The adapter answers: the same 4-bit base without it says something else.
    base = _invoke([resolve_model(str(qlora_run)).base, *args, "--set", "quant.bits=4"])
    assert out[0]["response"] != base[0]["response"]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--greedy"], 2, "no prompts"),
        (["--prompts", "missing.jsonl"], 3, "missing.jsonl: data file not found"),
        (["--prompt", "hi", "--stop", ""], 2, "empty stop string"),
        # No loader would pass it on, and a run records its base by path alone.
        (["--prompt", "hi", "--set", "model.revision=main"], 2, "revision is not supported"),
    ],
)
def test_usage_errors(sft_full_run, args, code, message):
    result = runner.invoke(app, ["generate", str(sft_full_run), *args])
    assert result.exit_code == code and message in result.stderr and result.stdout == ""


def test_qlora_chain_keeps_every_adapter_live_on_the_4bit_base(qlora_run, tmp_path):
    """A QLoRA PPO run keeps its SFT adapter live on the 4-bit base while it trains; loading the run must
    not fold that adapter into the 4-bit weights (which rounds it) but stack both, as PPO did."""
    from dataclasses import replace

    import bitsandbytes as bnb
    import torch
    from fixtures_runs import random_lora
    from peft import PeftModel
    from transformers import AutoTokenizer

    from rlhf_cli.core.inference import load_causal_lm
    from rlhf_cli.core.loading import load_model
    from rlhf_cli.recipe import ModelSpec, QuantSpec
    from rlhf_cli.runs import resolve_model

    run = random_lora(qlora_run, tmp_path / "ppo", seed=5, quant_bits=4, scale=0.1)
    loaded = load_causal_lm(ModelSpec(path=str(run), dtype="fp32"))
    assert loaded.quant.bits == 4 and any(isinstance(m, bnb.nn.Linear4bit) for m in loaded.model.modules())
    resolved = resolve_model(str(run))
    # As PPO holds it: the 4-bit base, the SFT adapter and the PPO adapter applied live, in that order.
    base = load_model(replace(resolved, adapters=()), dtype=torch.float32, quant=QuantSpec(bits=4))
    trained = PeftModel.from_pretrained(base, resolved.adapters[0], adapter_name="sft")
    trained.load_adapter(resolved.adapters[1], adapter_name="ppo")
    trained.base_model.set_adapter(["sft", "ppo"])
    tok = AutoTokenizer.from_pretrained(resolved.tokenizer_path)
    enc = tok(["<|user|>where is the cat?<|end|><|assistant|>the cat"], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        expected, got = trained(**enc).logits, loaded.model(**enc).logits
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


@pytest.mark.parametrize("command", [
    ["generate", "{rm}", "-p", "hi"],
    ["sft", "--model", "{rm}", "--data", "{chat}", "--dry-run"],
    ["ppo", "--policy", "{rm}", "--reward", "{rm}", "--prompts", "{prompts}", "--dry-run"],
])
def test_a_reward_run_given_as_the_language_model_is_a_usage_error(tiny, reward_run, tmp_path, command):
    """A causal LM loaded from a reward run keeps its base and drops the score head without a word: it would
    sample or train the base as if it were the run."""
    names = {"rm": str(reward_run), "chat": str(tiny["chat"]), "prompts": str(tiny["prompts"])}
    out = tmp_path / "out"
    args = [a.format(**names) for a in command] + ([] if command[0] == "generate" else ["--output-dir", str(out)])
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        f"error: {reward_run} is a reward model run (run.json model.kind), not a language model: pass an sft, dpo, "
        "ppo or pretrain run, or a causal LM directory (a reward model goes to --reward)"]
    assert not out.exists()


@pytest.mark.parametrize("command", ["generate", "compare"])
def test_jsonl_is_utf8_whatever_the_stdout_encoding(command, monkeypatch, tmp_path):
    """On a latin-1 (or cp1252) stdout an emoji in an answer raised UnicodeEncodeError and stopped the stream;
    JSONL lines are UTF-8 bytes whatever the locale."""
    import rlhf_cli.stages.compare as compare_stage
    import rlhf_cli.stages.generate as generate_stage

    record = {"prompt": "hi", "response": "café 😀", "score": float("nan")}
    monkeypatch.setattr(generate_stage, "generate", lambda recipe, prompts, prompts_file: iter([record, record]))
    monkeypatch.setattr(compare_stage, "compare", lambda recipe: iter([record, record]))
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    args = {"generate": ["m", "-p", "hi"], "compare": ["m", "--prompts", str(tmp_path / "p.jsonl"), "--reward", "x.y:z"]}
    result = CliRunner(charset="latin-1").invoke(app, [command, *args[command]])
    assert result.exit_code == 0, (result.exception, result.stderr)
    lines = result.stdout_bytes.decode("utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [{**record, "score": None}] * 2

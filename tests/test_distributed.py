"""Several processes: two CPU processes (gloo) under `accelerate launch` and torchrun, against one process.

The launched tests start `accelerate launch --config_file recipes/accelerate/cpu-2proc.yaml` (accelerate's
torchrun launcher; its `--cpu` flag would start a single process without an MPI hostfile) on the tiny
fixture and compare with the same recipe run in one process: the data is split between the ranks, only
rank 0 writes, the step counts and the saved tensors' shapes agree, and errors end every rank with exit 2.
The unit tests below them check the launch rules and the rank helpers without starting processes.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rlhf_cli.cli import app
from rlhf_cli.errors import RecipeError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "recipes" / "accelerate"
SFT_RECIPE = REPO / "recipes" / "tiny" / "sft.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "RLHF_TEST_INTERRUPT_AT_STEP")}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    return env


def accelerate(cwd: Path, *args: str, logs: Path | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch` with two CPU processes; per-rank stdout/stderr files under `logs` when given."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "cpu-2proc.yaml"),
           "--main_process_port", str(free_port()), "--monitor_interval", "1"]
    if logs is not None:
        cmd += ["--tee", "3", "--log_dir", str(logs)]
    return subprocess.run([*cmd, "-m", "rlhf_cli", *args], cwd=cwd, env=launch_env(), capture_output=True, text=True,
                          timeout=300)


def rank_logs(logs: Path, stream: str) -> dict[int, str]:
    """torchrun's per-rank files: LOG_DIR/<run id>/attempt_0/<rank>/stderr.log."""
    return {int(p.parent.name): p.read_text() for p in logs.glob(f"*/attempt_*/*/{stream}.log")}


def manifest(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())


def metric_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            shapes.update({k: tuple(st.get_slice(k).get_shape()) for k in st.keys()})
    return shapes


def update_gaps(a: Path, b: Path) -> dict[str, float]:
    """||dW_a - dW_b|| / ||dW_a|| for the update B @ A of every LoRA layer two runs saved."""
    from safetensors.torch import load_file

    ta, tb = (load_file(str(f / "adapter_model.safetensors")) for f in (a, b))
    assert ta.keys() == tb.keys()
    gaps = {}
    for key in (k for k in ta if "lora_A" in k):
        other = key.replace("lora_A", "lora_B")
        da, db = (t[other].float() @ t[key].float() for t in (ta, tb))
        gaps[key.replace(".lora_A.weight", "")] = float((da - db).norm() / da.norm().clamp_min(1e-12))
    return gaps


def lora_b_norm(folder: Path) -> float:
    from safetensors.torch import load_file

    return sum(float(v.abs().sum()) for k, v in load_file(str(folder / "adapter_model.safetensors")).items() if "lora_B" in k)


def invoke(*args: str):
    from typer.testing import CliRunner

    return CliRunner().invoke(app, list(args))


# --------------------------------------------------------------------------- sft: two processes against one

# 160 chats, one epoch, eval on 50: 10 optimizer steps at a global batch of 16 (16 x 1 process, or 8 x 2).
SFT_SETS = ["data.max_samples=160", "train.max_steps=null", "train.epochs=1", "train.logging_steps=1",
            "train.save_steps=5", "lora.dropout=0.0"]


def sft_args(tiny: dict, out: Path, batch: int, held_out: Path | None = None) -> list[str]:
    sets = [*SFT_SETS, f"train.batch_size={batch}", f"model.path={tiny['model']}", f"data.train={tiny['chat']}",
            f"data.eval={held_out or tiny['chat_eval']}"]
    return ["sft", str(SFT_RECIPE), "--output-dir", str(out), "--json", *[a for s in sets for a in ("--set", s)]]


@pytest.fixture(scope="module")
def sft_pair(tiny, tmp_path_factory):
    import torch

    root = tmp_path_factory.mktemp("dist-sft")
    # The first held-out answer is unlike every other (a loss far above theirs): counted twice, it shows.
    chats = [json.loads(line) for line in Path(tiny["chat_eval"]).read_text().splitlines()]
    chats[0]["messages"][-1]["content"] = " ".join(["zebra purple quantum"] * 6)
    held_out = root / "chat_eval.jsonl"
    held_out.write_text("".join(json.dumps(c) + "\n" for c in chats))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = invoke(*sft_args(tiny, root / "one", batch=16, held_out=held_out))
    finally:
        torch.set_num_threads(threads)
    assert single.exit_code == 0, single.output
    t0 = time.monotonic()
    two = accelerate(root, *sft_args(tiny, root / "two", batch=8, held_out=held_out))
    seconds = time.monotonic() - t0
    assert two.returncode == 0, two.stderr[-3000:]
    return {"root": root, "one": root / "one", "two": root / "two", "launch": two, "seconds": seconds}


@pytest.mark.dist
@pytest.mark.stage
def test_sft_two_processes_split_the_data_and_match_one(sft_pair):
    one, two = manifest(sft_pair["one"]), manifest(sft_pair["two"])
    assert two["status"] == "completed"
    d1, d2 = one["distributed"], two["distributed"]
    assert (d1["world_size"], d2["world_size"]) == (1, 2) and d2["sharding"] == "ddp"
    assert d1["global_batch_size"] == d2["global_batch_size"] == 16
    # Both ranks trained, each on half of the data (DistributedSampler), not each on all of it.
    a, b = d2["samples_per_rank"]
    assert a > 0 and b > 0 and abs(a - b) <= 1
    assert a + b == d1["samples_per_rank"][0] == 160
    # Same global batch, same number of optimizer steps (twice as many if every rank read all samples).
    assert one["metrics"]["steps"] == two["metrics"]["steps"] == 10
    # Per-token loss over both ranks (not halved by a token count taken over both ranks), over the 50
    # held-out chats once: accelerate completes the last batch of 16 with 14 repeats, which count nowhere.
    assert two["metrics"]["eval_loss"] == pytest.approx(one["metrics"]["eval_loss"], rel=1e-3)
    assert two["metrics"]["train_loss"] == pytest.approx(one["metrics"]["train_loss"], rel=0.1)
    # One writer: one line per logged step, one result on stdout, one adapter shaped like the single run's.
    steps = [r["step"] for r in metric_rows(sft_pair["two"]) if "loss" in r]
    assert steps == sorted(set(steps)) and len(steps) == len([r for r in metric_rows(sft_pair["one"]) if "loss" in r])
    results = [json.loads(line) for line in sft_pair["launch"].stdout.splitlines() if line.startswith("{")]
    assert len(results) == 1 and results[0]["status"] == "completed"
    assert tensor_shapes(sft_pair["two"] / "adapter") == tensor_shapes(sft_pair["one"] / "adapter") != {}
    # The same samples make each global batch in both runs (accelerate shards the one sampler's batches), so
    # every step's loss and the trained adapter agree up to bf16 arithmetic on other batch shapes.
    # Measured: step losses within 3e-5 relative, LoRA updates B @ A within 0.6% (median 0.1%); with the
    # adapters drawn from the process's RNG state instead of train.seed they differed by 140%.
    losses = {n: [r["loss"] for r in metric_rows(sft_pair[n]) if "loss" in r] for n in ("one", "two")}
    assert losses["two"] == pytest.approx(losses["one"], rel=2e-4)
    gaps = update_gaps(sft_pair["one"] / "adapter", sft_pair["two"] / "adapter")
    assert gaps and max(gaps.values()) < 0.03, gaps
    # Checkpoints: both ranks' RNG states, marked complete only once both were written.
    ckpt = sft_pair["two"] / "checkpoints" / "checkpoint-10"
    assert (ckpt / "COMPLETE").exists() and {p.name for p in ckpt.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}


@pytest.mark.dist
@pytest.mark.stage
def test_rank0_refusal_exits_2_on_every_rank(tiny, sft_pair):
    """The output directory holds a completed run: rank 0 refuses, and rank 1 (told, not waiting) too."""
    run = sft_pair["two"]
    before = (run / "run.json").read_text()
    logs = sft_pair["root"] / "logs-refused"
    t0 = time.monotonic()
    result = accelerate(sft_pair["root"], *sft_args(tiny, run, batch=8), logs=logs)
    seconds = time.monotonic() - t0
    # accelerate launch exits 1 whenever a rank fails; each rank's own exit code is in its failure summary.
    assert result.returncode != 0
    assert sorted(re.findall(r"exitcode\s+:\s*(-?\d+)", result.stderr)) == ["2", "2"], result.stderr[-3000:]
    errors = rank_logs(logs, "stderr")
    assert set(errors) == {0, 1}
    for text in errors.values():
        assert "error:" in text and "holds a completed sft run" in text and "--overwrite" in text
    assert (run / "run.json").read_text() == before
    assert seconds < 120


@pytest.mark.dist
@pytest.mark.stage
def test_recipe_error_exits_2_on_every_rank_under_torchrun(tmp_path):
    logs = tmp_path / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "--monitor_interval", "1", "--tee", "3", "--log_dir", str(logs),
           "-m", "rlhf_cli", "sft", str(SFT_RECIPE), "--set", "train.lr=fast"]
    t0 = time.monotonic()
    result = subprocess.run(cmd, cwd=tmp_path, env=launch_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and time.monotonic() - t0 < 60
    assert sorted(re.findall(r"exitcode\s+:\s*(-?\d+)", result.stderr)) == ["2", "2"], result.stderr[-3000:]
    errors = rank_logs(logs, "stderr")
    assert set(errors) == {0, 1}
    for text in errors.values():
        assert "train.lr" in text and "valid number" in text
    assert not (tmp_path / "runs").exists()


@pytest.mark.dist
@pytest.mark.stage
def test_sft_divergence_ends_every_rank_with_exit_1_and_the_same_line(tiny, tmp_path):
    """lr 1e30: the loss is NaN at step 2 (not a logged one) on both ranks; both must stop there, before its save."""
    logs = tmp_path / "logs"
    args = [*sft_args(tiny, tmp_path / "run", batch=8), "--set", "train.lr=1e30", "--set", "train.save_steps=2",
            "--set", "train.logging_steps=5"]
    t0 = time.monotonic()
    result = accelerate(tmp_path, *args, logs=logs)
    seconds = time.monotonic() - t0
    assert sorted(re.findall(r"exitcode\s+:\s*(-?\d+)", result.stderr)) == ["1", "1"], result.stderr[-3000:]
    lines = {rank: [line for line in text.splitlines() if line.startswith("error:")]
             for rank, text in rank_logs(logs, "stderr").items()}
    assert set(lines) == {0, 1} and lines[0] == lines[1] and len(lines[0]) == 1, lines
    assert "at step 2: training diverged; lower train.lr (now 1e+30)" in lines[0][0]
    assert manifest(tmp_path / "run")["status"] == "failed"
    assert not list((tmp_path / "run").glob("checkpoints/*/COMPLETE"))
    assert seconds < 120


# --------------------------------------------------------------------------- ppo: two processes against one

PPO_SETS = {"ppo.iterations": 2, "ppo.rollout_batch_size": 8, "ppo.mini_batch_size": 4, "ppo.ppo_epochs": 2,
            "ppo.lr": 3e-3, "generation.max_new_tokens": 8, "lora.r": 8, "lora.alpha": 16}


def ppo_args(tiny: dict, policy: Path, out: Path) -> list[str]:
    args = ["ppo", "--policy", str(policy), "--reward", "tests.dist_support:answer_length", "--prompts", str(tiny["prompts"]),
            "--output-dir", str(out), "--json"]
    return args + [a for k, v in PPO_SETS.items() for a in ("--set", f"{k}={v}")]


@pytest.mark.dist
@pytest.mark.stage
def test_ppo_two_processes_share_the_rollout_and_match_one(tiny, sft_full_run, tmp_path):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = invoke(*ppo_args(tiny, sft_full_run, tmp_path / "one"))
    finally:
        torch.set_num_threads(threads)
    assert single.exit_code == 0, single.output
    two = accelerate(tmp_path, *ppo_args(tiny, sft_full_run, tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]

    one_m, two_m = manifest(tmp_path / "one"), manifest(tmp_path / "two")
    assert two_m["status"] == "completed" and two_m["metrics"]["iterations"] == one_m["metrics"]["iterations"] == 2
    # 8 prompts per iteration in both runs: all 8 on one process, or 4 sampled by each of two.
    assert one_m["distributed"]["samples_per_rank"] == [16]
    assert two_m["distributed"]["samples_per_rank"] == [8, 8] and two_m["distributed"]["world_size"] == 2
    rows_one, rows_two = metric_rows(tmp_path / "one"), metric_rows(tmp_path / "two")
    assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one] == [1, 2]
    assert set(rows_two[-1]) == set(rows_one[-1])
    for folder in ("adapter", "value"):
        assert tensor_shapes(tmp_path / "two" / folder) == tensor_shapes(tmp_path / "one" / folder) != {}
    # Both adapters trained in both runs (lora_B starts at zero): under DDP every trainable tensor needs a gradient.
    for run in ("one", "two"):
        for folder in ("adapter", "value"):
            assert lora_b_norm(tmp_path / run / folder) > 0, (run, folder)
    ckpt = tmp_path / "two" / "checkpoints" / "checkpoint-2"
    assert (ckpt / "COMPLETE").exists() and (ckpt / "rng-0.pt").exists() and (ckpt / "rng-1.pt").exists()
    assert len([line for line in two.stdout.splitlines() if line.startswith("{")]) == 1


@pytest.mark.dist
@pytest.mark.stage
def test_ppo_processes_draw_their_own_answers_to_one_prompt(tiny, sft_full_run, tmp_path, monkeypatch):
    """One prompt, so both processes sample for it: with the same random stream on both, rank 1 repeated
    rank 0's answers word for word, and half of the rollout was work done twice."""
    prompts = tmp_path / "one-prompt.jsonl"
    prompts.write_text(Path(tiny["prompts"]).read_text().splitlines()[0] + "\n")
    monkeypatch.setenv("RLHF_TEST_ANSWERS", str(tmp_path / "answers"))
    args = ppo_args(tiny, sft_full_run, tmp_path / "run")
    args[args.index("tests.dist_support:answer_length")] = "tests.dist_support:answer_length_recorded"
    args[args.index(str(tiny["prompts"]))] = str(prompts)
    args[args.index("ppo.iterations=2")] = "ppo.iterations=1"
    result = accelerate(tmp_path, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    answers = {r: [json.loads(line)["responses"] for line in (tmp_path / f"answers-{r}.jsonl").read_text().splitlines()]
               for r in (0, 1)}
    assert len(answers[0][0]) == len(answers[1][0]) == 4
    assert answers[0] != answers[1], answers


@pytest.mark.dist
@pytest.mark.stage
def test_ppo_phase_times_are_the_slowest_processes(tiny, sft_full_run, tmp_path):
    """Rank 1 samples its second rollout a second slower than rank 0: the run spent that second, so
    time_generation holds it and tokens_per_s_generation is every process's answer tokens over it (rank 0's
    own 0.05 s gave 1,200 tokens/s where the run sampled 61)."""
    args = ppo_args(tiny, sft_full_run, tmp_path / "run")
    args[args.index("tests.dist_support:answer_length")] = "tests.dist_support:answer_length_slow_sampling_on_rank_1"
    result = accelerate(tmp_path, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    last = metric_rows(tmp_path / "run")[-1]
    assert last["step"] == 2 and last["time_generation"] >= 1.0, last
    answer_tokens = last["response_length"] * PPO_SETS["ppo.rollout_batch_size"]
    assert last["tokens_per_s_generation"] == pytest.approx(answer_tokens / last["time_generation"], rel=1e-6)


GRPO_SETS = {"grpo.iterations": 2, "grpo.rollout_batch_size": 16, "grpo.group_size": 4, "grpo.mini_batch_size": 8,
             "grpo.ppo_epochs": 2, "grpo.lr": 3e-3, "grpo.advantage": "reinforce_pp", "generation.max_new_tokens": 8,
             "lora.r": 8, "lora.alpha": 16}


@pytest.mark.dist
@pytest.mark.stage
def test_grpo_two_processes_sample_whole_groups_and_match_one(tiny, sft_full_run, tmp_path):
    """reinforce_pp whitens over the whole batch, so the two processes reduce its statistics together."""
    import torch

    def args(out: Path) -> list[str]:
        return ["grpo", "--policy", str(sft_full_run), "--reward", "tests.dist_support:answer_length", "--prompts",
                str(tiny["prompts"]), "--output-dir", str(out), "--json",
                *[a for k, v in GRPO_SETS.items() for a in ("--set", f"{k}={v}")]]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = invoke(*args(tmp_path / "one"))
    finally:
        torch.set_num_threads(threads)
    assert single.exit_code == 0, single.output
    two = accelerate(tmp_path, *args(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    one_m, two_m = manifest(tmp_path / "one"), manifest(tmp_path / "two")
    # 4 prompts x 4 answers per iteration: all on one process, or 2 whole groups on each of two.
    assert one_m["distributed"]["samples_per_rank"] == [32]
    assert two_m["distributed"]["samples_per_rank"] == [16, 16]
    rows_one, rows_two = metric_rows(tmp_path / "one"), metric_rows(tmp_path / "two")
    assert set(rows_two[-1]) == set(rows_one[-1]) and "zero_std_groups" in rows_two[-1]
    assert tensor_shapes(tmp_path / "two" / "adapter") == tensor_shapes(tmp_path / "one" / "adapter") != {}
    assert lora_b_norm(tmp_path / "two" / "adapter") > 0
    assert not (tmp_path / "two" / "value").exists()


@pytest.mark.dist
@pytest.mark.stage
def test_a_nan_reward_on_one_rank_ends_every_rank_with_exit_1_and_the_same_line(tiny, sft_full_run, tmp_path):
    """Rank 1's reward is NaN, rank 0's is not: both must stop at that iteration, not rank 0 waiting in the
    next collective for a rank that has gone."""
    args = ppo_args(tiny, sft_full_run, tmp_path / "run")
    args[args.index("tests.dist_support:answer_length")] = "tests.dist_support:nan_on_rank_1"
    logs = tmp_path / "logs"
    t0 = time.monotonic()
    result = accelerate(tmp_path, *args, logs=logs)
    seconds = time.monotonic() - t0
    assert result.returncode != 0
    assert sorted(re.findall(r"exitcode\s+:\s*(-?\d+)", result.stderr)) == ["1", "1"], result.stderr[-3000:]
    lines = {rank: [line for line in text.splitlines() if line.startswith("error:")]
             for rank, text in rank_logs(logs, "stderr").items()}
    assert set(lines) == {0, 1} and lines[0] == lines[1], lines
    assert lines[0] == ["error: iteration 1: the reward returned NaN/inf for 4 of 8 responses: make the reward "
                        "function (or model) return finite scores"]
    assert manifest(tmp_path / "run")["status"] == "failed"
    assert seconds < 120


# --------------------------------------------------------------------------- launch rules (no processes started)


@pytest.fixture
def env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                 "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE",
                 "ACCELERATE_DEEPSPEED_CONFIG_FILE", "ACCELERATE_USE_CPU", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def sft_recipe(**sets):
    from rlhf_cli.recipe_load import load_recipe

    return load_recipe("sft", SFT_RECIPE, sets=[f"{k}={v}" for k, v in sets.items()])


def ppo_recipe(**sets):
    from rlhf_cli.recipe_load import load_recipe

    flags = {"policy.path": "runs/sft", "reward.function": "tests.ppo_support:says_great", "data.train": "p.jsonl"}
    return load_recipe("ppo", None, flags=flags, sets=[f"{k}={v}" for k, v in sets.items()])


def test_ranks_come_from_the_launcher_environment(env):
    from rlhf_cli.core import distributed
    from rlhf_cli.runs import is_main_process

    assert (distributed.rank(), distributed.world_size(), distributed.sharding(), is_main_process()) == (0, 1, "none", True)
    env.setenv("RANK", "3")
    env.setenv("WORLD_SIZE", "4")
    env.setenv("LOCAL_RANK", "1")
    assert (distributed.rank(), distributed.world_size(), distributed.local_rank()) == (3, 4, 1)
    assert distributed.sharding() == "ddp" and not is_main_process()
    env.delenv("RANK")
    env.delenv("WORLD_SIZE")
    env.setenv("PMI_RANK", "1")  # mpirun's names
    env.setenv("PMI_SIZE", "2")
    assert (distributed.rank(), distributed.world_size()) == (1, 2)


def test_sharding_mode_from_accelerate_launch(env, tmp_path):
    from rlhf_cli.core.distributed import sharding

    env.setenv("ACCELERATE_USE_FSDP", "true")
    assert sharding() == "fsdp"
    env.delenv("ACCELERATE_USE_FSDP")
    env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert sharding() == "zero2"  # accelerate's default stage
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    env.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(config))
    assert sharding() == "zero3"
    env.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "1")
    assert sharding() == "zero1"


@pytest.mark.parametrize("mode", [{"ACCELERATE_USE_FSDP": "true"},
                                  {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}])
def test_quantized_base_refused_under_sharded_weights(env, mode):
    from rlhf_cli.core.distributed import check_launch

    for k, v in mode.items():
        env.setenv(k, v)
    check_launch("sft", sft_recipe())  # unquantized: fine
    with pytest.raises(RecipeError, match=r"quant.bits 4 under (FSDP|DeepSpeed ZeRO-3).*ddp.yaml"):
        check_launch("sft", sft_recipe(**{"quant.bits": 4}))


def test_quantized_base_allowed_under_ddp_and_zero2(env):
    from rlhf_cli.core.distributed import check_launch

    env.setenv("WORLD_SIZE", "2")
    check_launch("sft", sft_recipe(**{"quant.bits": 4}))
    env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    env.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    check_launch("sft", sft_recipe(**{"quant.bits": 4}))


def test_ppo_launch_rules(env):
    from rlhf_cli.core.distributed import check_launch

    env.setenv("WORLD_SIZE", "2")
    check_launch("ppo", ppo_recipe(**{"ppo.rollout_batch_size": 8, "ppo.mini_batch_size": 4}))
    with pytest.raises(RecipeError, match="global batch sizes: under 2 processes.*multiples of 2"):
        check_launch("ppo", ppo_recipe(**{"ppo.rollout_batch_size": 6, "ppo.mini_batch_size": 3}))
    env.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(RecipeError, match="ppo runs on one process or under DDP, not under FSDP"):
        check_launch("ppo", ppo_recipe(**{"ppo.rollout_batch_size": 8, "ppo.mini_batch_size": 4}))


def test_grpo_launch_rules(env):
    from rlhf_cli.core.distributed import check_launch
    from rlhf_cli.recipe_load import load_recipe

    def recipe(**sets):
        flags = {"policy.path": "runs/sft", "reward.function": "tests.ppo_support:says_great", "data.train": "p.jsonl"}
        return load_recipe("grpo", None, flags=flags, sets=[f"{k}={v}" for k, v in sets.items()])

    env.setenv("WORLD_SIZE", "2")
    check_launch("grpo", recipe(**{"grpo.rollout_batch_size": 16, "grpo.group_size": 4, "grpo.mini_batch_size": 8}))
    # 3 prompts of 4 answers cannot be split into whole groups over 2 processes.
    with pytest.raises(RecipeError, match=r"multiples of 2 \(and grpo.rollout_batch_size to a multiple of 2 x grpo.group_size\)"):
        check_launch("grpo", recipe(**{"grpo.rollout_batch_size": 12, "grpo.group_size": 4, "grpo.mini_batch_size": 4}))
    env.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(RecipeError, match="grpo runs on one process or under DDP, not under FSDP"):
        check_launch("grpo", recipe())


def test_refusal_happens_before_anything_is_written(env, tmp_path):
    env.setenv("ACCELERATE_USE_FSDP", "true")
    out = tmp_path / "run"
    result = invoke("sft", str(SFT_RECIPE), "--set", "quant.bits=4", "--output-dir", str(out))
    assert result.exit_code == 2 and "under FSDP" in result.output
    assert not out.exists()


def test_other_ranks_leave_generate_and_eval_to_rank_0(env, tmp_path):
    # Rank 1 of 2 validates (a recipe error is its error too) and then has nothing to do: no model is
    # loaded (this one does not exist) and nothing is printed.
    env.setenv("RANK", "1")
    env.setenv("WORLD_SIZE", "2")
    missing = str(tmp_path / "no-model")
    result = invoke("generate", missing, "--prompt", "hi")
    assert result.exit_code == 0 and result.stdout == ""
    result = invoke("eval", "--model", missing, "--metric", "length", "--prompts", str(tmp_path / "p.jsonl"))
    assert result.exit_code == 0 and result.stdout == ""
    assert invoke("generate", missing, "--prompt", "hi", "--temperature", "-1").exit_code == 2


def test_on_main_single_process_passes_through(env):
    from rlhf_cli.core import distributed

    assert distributed.on_main(lambda: {"a": 1}) == {"a": 1}
    assert distributed.broadcast_json([1, 2]) == [1, 2] and distributed.gather_ints(5) == [5]
    assert distributed.report(7) == {"world_size": 1, "sharding": "none", "samples_per_rank": [7]}

    def refuse():
        raise RecipeError("no")

    with pytest.raises(RecipeError, match="no"):
        distributed.on_main(refuse)


def test_accelerate_configs_are_valid():
    from accelerate.commands.config.config_args import load_config_from_file

    configs = sorted(CONFIGS.glob("*.yaml"))
    assert {p.name for p in configs} >= {"ddp.yaml", "fsdp.yaml", "deepspeed-zero2.yaml", "deepspeed-zero3.yaml",
                                        "multi-node.yaml", "cpu-2proc.yaml"}
    for path in configs:
        raw = yaml.safe_load(path.read_text())
        for key in ("compute_environment", "distributed_type", "num_processes", "num_machines", "mixed_precision"):
            assert key in raw, f"{path.name}: no {key}"
        # accelerate's own loader rejects unknown keys and bad values.
        config = load_config_from_file(str(path))
        assert config.num_processes >= 2, path.name
        assert raw["mixed_precision"] == "no", f"{path.name}: precision comes from the recipe's model.dtype"
    assert yaml.safe_load((CONFIGS / "fsdp.yaml").read_text())["fsdp_config"]["fsdp_use_orig_params"] is True
    assert yaml.safe_load((CONFIGS / "deepspeed-zero3.yaml").read_text())["deepspeed_config"]["zero3_save_16bit_model"]


def test_single_process_cpu_launch_is_named(env, caplog):
    """`accelerate launch --cpu --num_processes 2` starts one process: say so instead of training alone silently."""
    import logging

    from rlhf_cli.core.distributed import check_launch

    env.setenv("ACCELERATE_USE_CPU", "True")
    env.setenv("MASTER_ADDR", "127.0.0.1")
    with caplog.at_level(logging.WARNING, logger="rlhf"):
        check_launch("sft", sft_recipe())
    assert "single process" in caplog.text and "--multi_gpu" in caplog.text


def test_sharded_modes_refused_on_cpu_processes(env):
    import torch

    from rlhf_cli.core import distributed
    from rlhf_cli.errors import TrainingError

    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only refusal")
    env.setenv("WORLD_SIZE", "2")
    env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(TrainingError, match="DeepSpeed ZeRO-2 needs CUDA GPUs"):
        distributed.init()


def test_finiteness_and_sums_on_one_process(env):
    import torch

    from rlhf_cli.core import distributed

    assert distributed.all_finite([torch.ones(3), torch.zeros(2, 2)]) and distributed.all_finite([])
    assert not distributed.all_finite([torch.ones(3), torch.tensor([1.0, float("inf")])])
    assert not distributed.all_finite([torch.tensor(float("nan"))])
    assert distributed.total(2.5) == 2.5


def test_explained_variance_over_two_processes_is_the_rollouts(tmp_path):
    """PPO's explained_variance under DDP is the figure of the whole rollout, not the mean of each rank's."""
    import torch
    import torch.multiprocessing as mp

    from rlhf_cli.ppo.algo import explained_variance
    from tests.dist_support import explained_variance_on_rank, rollout_for_explained_variance

    mp.start_processes(explained_variance_on_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    whole = float(explained_variance(*rollout_for_explained_variance()))
    assert whole == pytest.approx(0.6, abs=0.1)
    # Each rank's own figure is 0: its predictions are its half's mean.
    assert [float(torch.load(tmp_path / f"ev-{r}.pt")) for r in (0, 1)] == pytest.approx([whole, whole], rel=1e-6)


def test_held_out_repeats_found_in_padded_and_flattened_batches():
    """5 held-out samples in global batches of 2 x 2: the last is sample 4 and three repeats, rank 0 holding
    the real one; a flattened row holds its samples one after another."""
    from types import SimpleNamespace

    import torch

    from rlhf_cli.core.trainer import _repeated_samples, real_samples

    def acc(rank: int, end: bool = True, remainder: int = 1):
        return SimpleNamespace(num_processes=2, process_index=rank,
                               gradient_state=SimpleNamespace(end_of_dataloader=end, remainder=remainder))

    rows = {"labels": torch.ones(2, 3, dtype=torch.long)}
    assert _repeated_samples(acc(0), rows).tolist() == [[False] * 3, [True] * 3]
    assert _repeated_samples(acc(1), rows).all()
    assert _repeated_samples(acc(0, end=False), rows) is None and _repeated_samples(acc(1, remainder=0), rows) is None
    assert _repeated_samples(acc(1, remainder=3), rows).tolist() == [[False] * 3, [True] * 3]
    assert [real_samples(acc(r, remainder=3), 2) for r in (0, 1)] == [2, 1]
    assert real_samples(acc(1), 2) == 0 and real_samples(acc(1, end=False), 2) == 2
    flat = {"labels": torch.ones(1, 5, dtype=torch.long), "position_ids": torch.tensor([[0, 1, 2, 0, 1]])}
    assert _repeated_samples(acc(0), flat).tolist() == [[False, False, False, True, True]]
    assert _repeated_samples(acc(0, remainder=2), flat) is None


# --------------------------------------------------------------------------- dpo: two processes against one


@pytest.mark.dist
@pytest.mark.stage
def test_dpo_two_processes_match_one(tiny, lora_run, tmp_path):
    """DPO under DDP: the data split between the ranks, one writer, and the same training as one process
    (the global batch holds the same pairs: accelerate shards the one sampler's batches)."""
    import torch

    recipe = REPO / "recipes" / "tiny" / "dpo.yaml"
    # 10 held-out pairs in global batches of 8: two processes pad their last batch with 6 repeated pairs.
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(Path(tiny["preference_eval"]).read_text().splitlines(keepends=True)[:10]))
    sets = ["train.max_steps=4", "train.logging_steps=1", "train.save_steps=2", f"model.path={lora_run}",
            f"data.train={tiny['preference']}", f"data.eval={held_out}", "lora.dropout=0.0",
            # fp32: bf16 matmuls round by the kernel the CPU has (AMX, AVX512-BF16), and the two layouts
            # (one batch of 8 pairs, two of 4) then part by more than the tolerance on some CPUs.
            "model.dtype=fp32"]

    def args(out: Path, batch: int) -> list[str]:
        return ["dpo", str(recipe), "--output-dir", str(out), "--json",
                *[a for s in [*sets, f"train.batch_size={batch}"] for a in ("--set", s)]]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = invoke(*args(tmp_path / "one", 8))
    finally:
        torch.set_num_threads(threads)
    assert single.exit_code == 0, single.output
    two = accelerate(tmp_path, *args(tmp_path / "two", 4))
    assert two.returncode == 0, two.stderr[-3000:]
    one_m, two_m = manifest(tmp_path / "one"), manifest(tmp_path / "two")
    assert two_m["distributed"]["world_size"] == 2 and two_m["distributed"]["global_batch_size"] == 8
    assert one_m["distributed"]["global_batch_size"] == 8
    losses = {n: [r["loss"] for r in metric_rows(tmp_path / n) if "loss" in r] for n in ("one", "two")}
    assert len(losses["two"]) == len(losses["one"]) == 4
    assert losses["two"] == pytest.approx(losses["one"], rel=1e-3, abs=1e-4)
    gaps = update_gaps(tmp_path / "one" / "adapter", tmp_path / "two" / "adapter")
    assert gaps and max(gaps.values()) < 0.05, gaps
    assert len([line for line in two.stdout.splitlines() if line.startswith("{")]) == 1
    # The held-out figures are over the 10 pairs once each, as one process counts them: the per-pair ones
    # (the repeated pairs counted, eval_accuracy was 13/16 for 8/10) and the token-level ones (with the
    # repeated pairs' tokens, eval_mean_token_accuracy was 0.234 for 0.225).
    for key in ("eval_accuracy", "eval_margin", "eval_rewards/chosen", "eval_rewards/rejected", "eval_logps/chosen",
                "eval_logps/rejected", "eval_entropy", "eval_logits/chosen", "eval_logits/rejected",
                "eval_mean_token_accuracy"):
        assert two_m["metrics"][key] == pytest.approx(one_m["metrics"][key], rel=1e-4, abs=1e-5), key

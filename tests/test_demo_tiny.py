"""End to end: `make demo-tiny`'s chain through the real CLI, with each hand-off and each stage's effect checked.

pretrain from scratch -> sft on the pretrain run -> train-rm on the sft run -> ppo (policy sft, reward rm)
-> dpo (sft on the same pairs) -> eval of each against sft (gated on beating it) -> generate
-> round 2 (compare -> train-rm from rm -> eval) -> report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def manifest(work: Path, name: str) -> dict:
    return json.loads((work / "runs" / name / "run.json").read_text())


def curve(work: Path, name: str, key: str) -> list[float]:
    rows = [json.loads(line) for line in (work / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("demo-tiny")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf_cli.demo.pipeline", "tiny", "--recipes", str(ROOT / "recipes/demo-tiny"),
         "--work", str(work)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return work


def test_each_stage_hands_off_to_the_next(chain):
    pre, sft, rm, ppo = (manifest(chain, n) for n in ("pretrain", "sft", "rm", "ppo"))
    assert all(m["status"] == "completed" for m in (pre, sft, rm, ppo))
    assert pre["model"]["kind"] == "full"
    assert Path(sft["parent_run"]).resolve() == (chain / "runs/pretrain").resolve()
    assert Path(rm["parent_run"]).resolve() == (chain / "runs/sft").resolve()
    assert rm["model"]["kind"] == "reward-adapter"
    assert Path(ppo["parent_run"]).resolve() == (chain / "runs/sft").resolve()
    assert ppo["layout"]["name"] == "shared-base"


def test_each_stage_had_its_effect(chain):
    pre = curve(chain, "pretrain", "loss")
    assert pre[-1] < 0.6 * pre[0], pre                      # from-scratch LM learned the fixture text
    sft = manifest(chain, "sft")["metrics"]
    assert sft["eval_loss"] < 1.0, sft                      # answers are predictable after SFT
    rm = manifest(chain, "rm")["metrics"]
    assert rm["eval_accuracy"] >= 0.8, rm                    # the "great" preference was learned
    # PPO's effect is judged on greedy answers to held-out prompts (the sampled rollout scores at
    # temperature 1 swing by +-2 between iterations): the reward model prefers PPO's answer to SFT's.
    metrics = json.loads((chain / "runs/eval/eval.json").read_text())["metrics"]
    assert metrics["win_rate"] >= 0.75, metrics


def test_eval_gates_and_outputs(chain):
    result = json.loads((chain / "runs/eval/eval.json").read_text())
    metrics = result["metrics"]
    assert metrics["win_rate"] >= 0.5 and metrics["rm_accuracy"] >= 0.7, metrics
    assert result["details"]["failed_gates"] == []
    prompts = [json.loads(line)["prompt"] for line in (chain / "assets/prompts_eval.jsonl").read_text().splitlines()]
    answers = {}
    for name in ("sft", "ppo"):
        rows = [json.loads(line) for line in (chain / f"{name}.jsonl").read_text().splitlines()]
        assert [r["prompt"] for r in rows] == prompts
        # Both policies learned to end their turn (SFT trains on the end-of-turn token).
        assert sum(r["finish_reason"] == "eos" for r in rows) >= 0.9 * len(rows), name
        answers[name] = [r["response"] for r in rows]
    assert sum(a != b for a, b in zip(answers["sft"], answers["ppo"])) >= len(prompts) // 2  # PPO changed what it says
    html = (chain / "report/report.html").read_text()
    assert "<img" in html and "ppo.jsonl" in html


def test_dpo_branch_beats_sft_under_the_reward_model(chain):
    """DPO learns from the pairs the reward model learned from, with no reward model and no sampling; the
    reward model PPO trained against prefers its greedy answers to the SFT policy's."""
    dpo = manifest(chain, "dpo")
    assert dpo["status"] == "completed"
    assert Path(dpo["parent_run"]).resolve() == (chain / "runs/sft").resolve()
    assert dpo["metrics"]["eval_accuracy"] > 0.5, dpo["metrics"]  # its implicit reward ranks held-out pairs
    result = json.loads((chain / "runs/eval_dpo/eval.json").read_text())
    assert result["recipe"]["model"]["path"] == "runs/dpo" and result["recipe"]["reference"]["path"] == "runs/sft"
    metrics = result["metrics"]
    assert metrics["win_rate"] > 0.5 and metrics["reward"] > metrics["reference_reward"], metrics
    corr = metrics["reward_length_corr"]
    assert corr is None or -1 <= corr <= 1  # null when every answer has one length
    html = (chain / "report/report.html").read_text()
    assert "eval_dpo" in html and "Reward model against an independent check" in html


def test_round_two_reward_model_judges_the_policy_better(chain):
    """The reason the loop exists: trained on the PPO policy's own answers ranked by the judge, the round-2
    reward model orders held-out answers of that policy better than the round-1 model does."""
    rows = [json.loads(line) for line in (chain / "round2_eval.jsonl").read_text().splitlines()]
    assert len(rows) == 50 and all(len(r["responses"]) == 4 and len(r["scores"]) == 4 for r in rows)
    if not (chain / "runs/rm2").exists():
        pytest.skip("the PPO policy collapsed to answers the judge scores alike: round 2 had nothing to compare")
    rm2 = manifest(chain, "rm2")
    assert Path(rm2["parent_run"]).resolve() == (chain / "runs/rm").resolve()
    first, second = (json.loads((chain / f"runs/eval_{rm}_round2/eval.json").read_text())["metrics"]["rm_accuracy"]
                     for rm in ("rm", "rm2"))
    # Measured: 0.880 -> 0.995, 0.868 -> 0.931, 0.822 -> 0.925, 0.540 -> 0.889, 0.493 -> 0.849, and 1.0 -> 1.0
    # (a policy collapsed to a few strings, which both models ordered right).
    assert second > first or first == second == 1.0, (first, second)

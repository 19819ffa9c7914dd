"""Shared fixtures: tiny local assets built once per test session (no network, no hub)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Run directories built by short training loops (tests/fixtures_runs.py), shared by the whole session.
from fixtures_runs import _fresh_rlhf_logging, lora_chain_run, lora_run, qlora_run, reward_run, sft_full_run  # noqa: F401

# Tests never reach a model hub, even by accident.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Tokenizer, 2-layer Llama and learnable fixture data (see rlhf_cli/demo/tiny.py)."""
    from rlhf_cli.demo.tiny import build_all

    return build_all(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def rl_start(tiny, tmp_path_factory) -> dict[str, Path]:
    """Where the ppo and grpo stage tests start, made by the stages themselves: `rlhf sft` of the tiny Llama
    (full fine-tuning, 120 steps: about a third of its sampled answers say "great") and `rlhf train-rm
    --model <that sft run>` (a LoRA adapter and score head on the fixture preferences, where chosen answers
    say "great"). Built on one thread, as those tests train."""
    from fixtures_runs import one_thread
    from stagekit import rlhf

    root = tmp_path_factory.mktemp("rl-start")
    sft, rm = root / "sft", root / "rm"
    with one_thread():
        done = rlhf("sft", "sft.yaml", "--model", str(tiny["model"]), "--data", str(tiny["chat"]),
                    "--set", f"data.eval={tiny['chat_eval']}", "--set", "lora=null", "--set", "train.max_steps=120",
                    "--output-dir", str(sft))
        assert done.code == 0, done
        done = rlhf("train-rm", "train-rm.yaml", "--model", str(sft), "--data", str(tiny["preference"]),
                    "--set", f"data.eval={tiny['preference_eval']}", "--set", "train.max_steps=80", "--output-dir", str(rm))
        assert done.code == 0, done
    return {"sft": sft, "rm": rm}


@pytest.fixture(scope="module")
def one_thread_module():
    """One torch thread for a whole module (the ppo and grpo stage tests: usefixtures): on two shared cores,
    one thread per test process avoids OpenMP oversubscription stalls."""
    from fixtures_runs import one_thread

    with one_thread():
        yield


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)

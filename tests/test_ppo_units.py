"""PPO pieces that need no model: prompt order, prompt reading, instability warnings.

The math has its own tests (tests/test_ppo_algo.py); the loop on tiny models is in tests/test_ppo_stage.py.
"""

from __future__ import annotations

import json
import logging


def test_prompt_order_draws_every_prompt_once_per_epoch():
    from rlhf_cli.ppo.loop import PromptOrder

    order = PromptOrder(10, seed=3)
    first, second = order.take(0, 10), order.take(10, 10)
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    assert order.take(7, 6) == first[7:] + second[:3]
    assert PromptOrder(10, seed=3).take(4, 9) == order.take(4, 9)  # resumable from a position alone


def test_message_prompts_drop_a_trailing_assistant_turn(tmp_path):
    from rlhf_cli.recipe import PPORecipe
    from rlhf_cli.stages.ppo import read_prompts

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

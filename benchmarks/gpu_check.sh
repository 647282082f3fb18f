#!/usr/bin/env bash
# make gpu-check: the real-scale path on a CUDA machine, in one command (aimed at < 8 minutes).
# Uses the torch / transformers / accelerate the machine already has (not the CPU pins):
#   PYTHON=python3 bash benchmarks/gpu_check.sh
# 0. wheels in .whl/ (`make gpu-wheels`, on a machine with a network: diffusers, bitsandbytes) are
#    installed into $WORK/site first, for machines that lack them and cannot reach an index;
# 1. benchmarks/scale.py on CUDA in bf16 with all 32 layers, with and without --low-memory, and generation;
# 2. a 2-step train under FSDP (configs/accelerate/fsdp.yaml) on every GPU;
# 3. DeepSpeed ZeRO-2 the same way when deepspeed imports (it is never installed from the network);
# 4. 2 steps with the frozen LLM in 4-bit (bitsandbytes NF4) and --low-memory, when bitsandbytes imports.
# Runs and checkpoints (many GB) go under $WORK (default /tmp/mmgen-gpu-check); the log, the benchmark's
# output and each run's metrics.jsonl go to $OUT (default: $WORK), a few small files.
# SMOKE=1: the same steps with tiny folders on the CPU, to try this script where there is no GPU
# (FSDP and DeepSpeed then stop with their one line; tests/test_scale.py runs it so).
set -uo pipefail
PYTHON=${PYTHON:-python3}
WORK=${WORK:-/tmp/mmgen-gpu-check}
SMOKE=${SMOKE:-}
# the whole check fits in BUDGET seconds (default 460: under 8 minutes with the set-up): each step gets the lesser of
# its own limit (SCALE_TIMEOUT 330, ENGINE_TIMEOUT 150) and what is left, so a quick step leaves more to the next
START=$(date +%s)
BUDGET=${BUDGET:-460}
limit() { local left=$(( BUDGET - ($(date +%s) - START) )); echo $(( left < $1 ? left : $1 )); }
OUT=${OUT:-$WORK}
CACHE=${MMGEN_SCALE_CACHE:-$WORK/scale-cache}
mkdir -p "$WORK" "$OUT"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" MMGEN_SCALE_CACHE="$CACHE" PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/gpu-check.log") 2>&1
if compgen -G ".whl/*.whl" > /dev/null; then
  echo "== 0. installing $(ls .whl | tr '\n' ' ')into $WORK/site"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
    .whl/*.whl || exit 1
  export PYTHONPATH="$PYTHONPATH:$WORK/site"  # after the machine's own packages: only what it lacks comes from here
fi
"$PYTHON" -c "import torch, transformers, accelerate, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'gpus', torch.cuda.device_count(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-', \
'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'diffusers', diffusers.__version__)" \
  || { echo "gpu-check: torch, transformers, accelerate and diffusers must import (make gpu-wheels carries diffusers)"; exit 1; }
NGPU=$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))")
BNB=$("$PYTHON" -c "import bitsandbytes" 2>/dev/null && echo yes || echo no)
if [ -n "$SMOKE" ]; then SCALE=(--smoke); else SCALE=(--device cuda --llm-layers 32); fi

SUMMARY=()
note() { if [ "$2" = 0 ]; then SUMMARY+=("$1 ok"); elif [ "$2" = 124 ]; then SUMMARY+=("$1 timed out"); else SUMMARY+=("$1 failed"); fi; }
in_time() {  # name, limit: run the rest with that limit, or say there was no time left for it
  local t; t=$(limit "$2")
  if [ "$t" -lt 20 ]; then echo "(no time left for $1)"; return 124; fi
  timeout "$t" "${@:3}"
}

echo "== 1. scale benchmark (${SCALE[*]}; bitsandbytes: $BNB)"
in_time scale "${SCALE_TIMEOUT:-330}" "$PYTHON" benchmarks/scale.py "${SCALE[@]}" | tee "$OUT/scale.txt"
code=${PIPESTATUS[0]}
if [ "$code" = 0 ] && ! tail -1 "$OUT/scale.txt" | grep -q '"errors": null'; then code=1; fi  # a part failed
note scale "$code"

# the benchmark's training run (its folders, 512 px, 2 steps, bf16 on a GPU), one override a line
mapfile -t RUN < <("$PYTHON" benchmarks/scale.py "${SCALE[@]}" --print-overrides)
run_engine() {  # name, accelerate config: 2 steps on every GPU, the metrics rows copied to $OUT
  rm -rf "$WORK/$1"
  in_time "$1" "${ENGINE_TIMEOUT:-150}" "$PYTHON" -m accelerate.commands.launch --config_file "$2" --num_processes "$NGPU" \
    -m cli.main train -c configs/mm_interleaved_7b.yaml "${RUN[@]}" train.out_dir="$WORK/$1" \
    && cp "$WORK/$1/metrics.jsonl" "$OUT/metrics-$1.jsonl" && tail -2 "$OUT/metrics-$1.jsonl"
}
echo "== 2. FSDP, 2 steps, $NGPU process(es)"
run_engine fsdp configs/accelerate/fsdp.yaml; note fsdp $?

if "$PYTHON" -c "import deepspeed" 2>/dev/null; then
  echo "== 3. DeepSpeed ZeRO-2, 2 steps"
  run_engine zero2 configs/accelerate/deepspeed_zero2.yaml; note zero2 $?
else
  echo "== 3. DeepSpeed: not installed here (skipped; never installed from the network)"
  SUMMARY+=("zero2 skipped")
fi

if [ "$BNB" = yes ]; then
  echo "== 4. the frozen LLM in 4-bit (NF4) with --low-memory, 2 steps, one GPU"
  rm -rf "$WORK/nf4"
  in_time nf4 "${ENGINE_TIMEOUT:-150}" "$PYTHON" -m cli.main train -c configs/mm_interleaved_7b.yaml "${RUN[@]}" \
    model.llm.quantize=4bit train.out_dir="$WORK/nf4" --low-memory \
    && cp "$WORK/nf4/metrics.jsonl" "$OUT/metrics-nf4.jsonl" && tail -2 "$OUT/metrics-nf4.jsonl"
  note nf4 $?
else
  echo "== 4. bitsandbytes: not installed here (make gpu-wheels carries it; skipped)"
  SUMMARY+=("nf4 skipped")
fi
LINE=$(IFS=,; echo "${SUMMARY[*]}")
echo "gpu-check: ${LINE//,/, }"
case "$LINE" in *failed*|*"timed out"*) exit 1 ;; esac

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
set -uo pipefail
PYTHON=${PYTHON:-python3}
WORK=${WORK:-/tmp/mmgen-gpu-check}
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
NGPU=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
BNB=$("$PYTHON" -c "import bitsandbytes" 2>/dev/null && echo yes || echo no)

echo "== 1. scale benchmark (cuda, bf16, 32 layers; bitsandbytes: $BNB)"
timeout "${SCALE_TIMEOUT:-330}" "$PYTHON" benchmarks/scale.py --device cuda --llm-layers 32 | tee "$OUT/scale.txt"

FOLDERS="model.vision.pretrained=$CACHE/clip-vit-large-patch14 model.llm.pretrained=$CACHE/llama-7b-width-32-layers \
model.decoder.pretrained=$CACHE/stable-diffusion-v1-5 data.sources=[{kind:shapes}] data.seq_len=256 data.image_size=512 \
data.max_images_per_seq=2 data.num_workers=0 train.batch_size=1 train.grad_accum=1 train.image_loss_limit=2 \
train.steps=2 train.save_every=2 train.log_every=1 train.warmup_steps=1"
run_engine() {  # name, accelerate config: 2 steps on every GPU, the metrics rows copied to $OUT
  rm -rf "$WORK/$1"
  timeout "${ENGINE_TIMEOUT:-120}" "$PYTHON" -m accelerate.commands.launch --config_file "$2" --num_processes "$NGPU" \
    -m cli.main train -c configs/mm_interleaved_7b.yaml $FOLDERS train.out_dir="$WORK/$1" \
    && cp "$WORK/$1/metrics.jsonl" "$OUT/metrics-$1.jsonl" && tail -2 "$OUT/metrics-$1.jsonl"
}
echo "== 2. FSDP, 2 steps, $NGPU process(es)"
run_engine fsdp configs/accelerate/fsdp.yaml

if "$PYTHON" -c "import deepspeed" 2>/dev/null; then
  echo "== 3. DeepSpeed ZeRO-2, 2 steps"
  run_engine zero2 configs/accelerate/deepspeed_zero2.yaml
else
  echo "== 3. DeepSpeed: not installed here (skipped; never installed from the network)"
fi

if [ "$BNB" = yes ]; then
  echo "== 4. the frozen LLM in 4-bit (NF4) with --low-memory, 2 steps, one GPU"
  rm -rf "$WORK/nf4"
  timeout "${ENGINE_TIMEOUT:-120}" "$PYTHON" -m cli.main train -c configs/mm_interleaved_7b.yaml $FOLDERS \
    model.llm.quantize=4bit train.out_dir="$WORK/nf4" --low-memory \
    && cp "$WORK/nf4/metrics.jsonl" "$OUT/metrics-nf4.jsonl" && tail -2 "$OUT/metrics-nf4.jsonl"
else
  echo "== 4. bitsandbytes: not installed here (make gpu-wheels carries it; skipped)"
fi

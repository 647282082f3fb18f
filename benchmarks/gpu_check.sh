#!/usr/bin/env bash
# make gpu-check: the real-scale path on a CUDA machine, in one command (aimed at < 8 minutes).
# Uses the torch / transformers / accelerate the machine already has (not the CPU pins):
#   PYTHON=python3 bash benchmarks/gpu_check.sh
# 1. benchmarks/scale.py on CUDA in bf16 with all 32 layers, with and without --low-memory, and generation;
# 2. a 2-step train under FSDP (configs/accelerate/fsdp.yaml) on every GPU;
# 3. DeepSpeed ZeRO-2 the same way when deepspeed imports (it is never installed from the network).
# Every line it prints also goes to $OUT/gpu-check.log (default /tmp/mmgen-gpu-check).
set -uo pipefail
PYTHON=${PYTHON:-python3}
OUT=${OUT:-/tmp/mmgen-gpu-check}
CACHE=${MMGEN_SCALE_CACHE:-$HOME/.cache/mmgen-scale}
mkdir -p "$OUT"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" MMGEN_SCALE_CACHE="$CACHE"
exec > >(tee -a "$OUT/gpu-check.log") 2>&1
"$PYTHON" -c "import torch, transformers, accelerate, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'gpus', torch.cuda.device_count(), 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, \
'diffusers', diffusers.__version__)" || exit 1
NGPU=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")

echo "== 1. scale benchmark (cuda, bf16, 32 layers)"
timeout 330 "$PYTHON" benchmarks/scale.py --device cuda --llm-layers 32 | tee "$OUT/scale.txt"

echo "== 2. FSDP, 2 steps, $NGPU process(es)"
FOLDERS="model.vision.pretrained=$CACHE/clip-vit-large-patch14 model.llm.pretrained=$CACHE/llama-7b-width-32-layers \
model.decoder.pretrained=$CACHE/stable-diffusion-v1-5 data.sources=[{kind:shapes}] data.seq_len=256 data.image_size=512 \
data.max_images_per_seq=2 data.num_workers=0 train.batch_size=1 train.grad_accum=1 train.image_loss_limit=2 \
train.steps=2 train.save_every=2 train.log_every=1 train.warmup_steps=1"
timeout 150 "$PYTHON" -m accelerate.commands.launch --config_file configs/accelerate/fsdp.yaml --num_processes "$NGPU" \
  -m cli.main train -c configs/mm_interleaved_7b.yaml $FOLDERS train.out_dir="$OUT/fsdp" && tail -2 "$OUT/fsdp/metrics.jsonl"

if "$PYTHON" -c "import deepspeed" 2>/dev/null; then
  echo "== 3. DeepSpeed ZeRO-2, 2 steps"
  timeout 150 "$PYTHON" -m accelerate.commands.launch --config_file configs/accelerate/deepspeed_zero2.yaml \
    --num_processes "$NGPU" -m cli.main train -c configs/mm_interleaved_7b.yaml $FOLDERS train.out_dir="$OUT/zero2" \
    && tail -2 "$OUT/zero2/metrics.jsonl"
else
  echo "== 3. DeepSpeed: not installed here (skipped; never installed from the network)"
fi

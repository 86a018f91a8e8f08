#!/usr/bin/env bash
# One byte-LM config trained on 1 GPU, then on NPROC GPUs with DDP and with FSDP2 (the FSDP2 run
# is stopped at STOP and resumed, which checks checkpoint/resume across ranks on the GPU), then
# compared: loss curves (CSV/PNG) and steady-state tokens/s scaling.
#
#   bash scripts/distributed_gpu.sh OUT_FOLDER        (run from the repository root)
#
# Run folders (with checkpoints, large) go to $RUNS (default /tmp/olsm_dist_runs); OUT_FOLDER gets
# the logs, each run's metrics.json and the comparison. Settings via the environment:
# NPROC (2), STEPS (200), STOP (100), OBJ (gated_deltanet), PRECISION (fp32), D_MODEL (512), LAYERS (4),
# SEQ_LEN (1024), BATCH (32, global), EXTRA (more options, e.g. --max-bytes 2000000).
# The timeouts (200 + 130 + 90 + 90 s) keep the whole script under the device tool's 600 s per command.
set -u
OUT=${1:?usage: distributed_gpu.sh OUT_FOLDER}
RUNS=${RUNS:-/tmp/olsm_dist_runs}
NPROC=${NPROC:-2}
STEPS=${STEPS:-200}
STOP=${STOP:-100}
OBJ=${OBJ:-gated_deltanet}
PRECISION=${PRECISION:-fp32}
mkdir -p "$OUT" "$RUNS"
# fp32 by default: the curves of 1 and N GPUs should agree to float32 rounding, so a gap is a bug
ARGS="lm -o $OBJ --d-model ${D_MODEL:-512} --n-layers ${LAYERS:-4} --num-heads 4 --seq-len ${SEQ_LEN:-1024}
      --batch-size ${BATCH:-32} --steps $STEPS
      --warmup 20 --lr 1e-3 --eval-every 100 --eval-windows 16 --checkpoint-every 1000 --precision $PRECISION
      --no-progress ${EXTRA:-}"
TRUN="python -m torch.distributed.run --standalone --nproc_per_node $NPROC"

{ nvidia-smi --query-gpu=name,memory.total --format=csv; python -c "import torch, triton;
print('torch', torch.__version__, 'triton', triton.__version__, 'gpus', torch.cuda.device_count())"; } \
    > "$OUT/env.txt" 2>&1

echo "== 1 GPU"
CUDA_VISIBLE_DEVICES=0 timeout 200 python -m olsm.cli train $ARGS --out "$RUNS/gpu1" > "$OUT/gpu1.log" 2>&1
echo "rc=$?"; tail -n 8 "$OUT/gpu1.log"

echo "== DDP x$NPROC"
timeout 130 $TRUN -m olsm.cli train $ARGS --parallel ddp --out "$RUNS/ddp" > "$OUT/ddp.log" 2>&1
echo "rc=$?"; tail -n 8 "$OUT/ddp.log"

echo "== FSDP2 x$NPROC: stop before step $STOP, then resume"
timeout 90 $TRUN -m olsm.cli train $ARGS --parallel fsdp --stop-at "$STOP" --out "$RUNS/fsdp" > "$OUT/fsdp.log" 2>&1
echo "rc=$?"
timeout 90 $TRUN -m olsm.cli train $ARGS --parallel fsdp --out "$RUNS/fsdp" >> "$OUT/fsdp.log" 2>&1
echo "rc=$?"; tail -n 8 "$OUT/fsdp.log"

echo "== compare"
python scripts/distributed_compare.py "1gpu:1:$RUNS/gpu1" "ddp:$NPROC:$RUNS/ddp" "fsdp:$NPROC:$RUNS/fsdp" \
    --out "$OUT/distributed" 2>&1 | tee "$OUT/compare.log"

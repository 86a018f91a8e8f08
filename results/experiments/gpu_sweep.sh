#!/usr/bin/env bash
# The experiments of docs/experiments.md as one parallel sweep: every run is its own process, spread
# round-robin over the GPUs. The models are tiny, so one run leaves a GPU mostly idle and is bound
# by the CPU launching kernels; running many at once is what makes the sweep fit in minutes.
#
#   OUT=folder bash results/experiments/gpu_sweep.sh      (repository root, olsm installed)
#
# Settings: MSTEPS (1000) MQAR steps, LSTEPS (600) LM steps, JOBS (24) runs at once, T (480) s per run,
# DEV (cuda), SEED (0), ONLY (a grep -E regex on run names, e.g. 'mqar-deltanet-128|lm-'). Writes $OUT/summary.txt (env, exit codes, the four tables), the two plots and $OUT/runs.tgz
# (metrics, logs; no checkpoints).
set -o pipefail; export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 COLUMNS=160
# many processes share a GPU: let each grow its cache in small segments (one run died of OOM at 28)
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
OUT=${OUT:?set OUT}; R=${R:-/tmp/sweep}; mkdir -p $R/logs "$OUT"
NGPU=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
python -c "import torch,triton,sys,sympy;print(torch.__version__,triton.__version__,sys.version.split()[0],sympy.__version__,torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu', 'x', torch.cuda.device_count())" >$OUT/env.txt 2>&1
M="--steps ${MSTEPS:-1000} --batch-size 128 --lr 3e-3 --warmup 50 --train-configs 64:4,128:8,256:16 --eval-configs 64:4,128:8,256:16,256:32 --eval-every 250 --checkpoint-every 250 --no-progress --device ${DEV:-cuda} --seed ${SEED:-0}"
L="--steps ${LSTEPS:-600} --batch-size 32 --seq-len 256 --d-model 128 --n-layers 4 --num-heads 2 --lr 2e-3 --eval-every 100 --checkpoint-every 300 --no-progress --device ${DEV:-cuda} --seed ${SEED:-0}"
{
  for dh in 64:1 128:2 256:4; do d=${dh%:*}; h=${dh#*:}
    for o in longhorn longhorn_diag gated_longhorn deltanet gated_deltanet mamba2 mamba1 gla linear_attention; do
      echo "mqar-$o-$d train mqar -o $o --d-model $d --num-heads $h $M --out $R/mqar"; done; done
  for o in longhorn longhorn_diag gated_deltanet mamba2 mamba1; do echo "lm-$o train lm -o $o $L --out $R/lm"; done
  for o in longhorn_diag mamba1; do echo "lmblock-$o train lm -o $o --block longhorn $L --out $R/lmblock"; done
  # control: the same runs on the torch (chunked PyTorch) backend, so a kernel bug would show as a gap
  for od in deltanet:64 longhorn:128; do o=${od%:*}; d=${od#*:}
    echo "ctl-$o-$d train mqar -o $o --d-model $d --num-heads $((d / 64)) $M --backend torch --out $R/mqar_torch"; done
} | grep -E "^[^ ]*(${ONLY:-.})" | awk -v g=$NGPU '{print (NR - 1) % g, $0}' > $R/jobs.txt
run(){ gpu=$1; name=$2; shift 2
  CUDA_VISIBLE_DEVICES=$gpu timeout ${T:-480} python -m olsm.cli "$@" > $R/logs/$name.log 2>&1; echo "$name rc=$?"; }
export -f run; export R T
xargs -P ${JOBS:-24} -L 1 bash -c 'run "$@"' _ < $R/jobs.txt | tee $R/rc.txt
# few files in $OUT: the device tool brings back only a handful per call (the rest goes in runs.tgz)
for d in mqar lm lmblock mqar_torch; do python -m olsm.cli train summarize $R/$d >$R/$d.txt 2>&1; done
cat $OUT/env.txt $R/rc.txt $R/{mqar,lm,lmblock,mqar_torch}.txt > $OUT/summary.txt
cp $R/mqar/accuracy_vs_dmodel.png $OUT/ 2>/dev/null; cp $R/lm/val_curves.png $OUT/lm_val_curves.png 2>/dev/null
(cd $R && tar czf $OUT/runs.tgz --exclude=checkpoint.pt --exclude='*.png' .)
cat $OUT/summary.txt; grep -h -i -E "error|warn" $R/logs/*.log | sort | uniq -c | head -20 || true

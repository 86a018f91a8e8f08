#!/usr/bin/env bash
# GPU experiments of docs/experiments.md: MQAR sweep (3 streams, one per d_model) + byte LM, in parallel.
set -o pipefail; export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 COLUMNS=160
# carried wheels only for what `python` lacks (that image's sympy is not on its torch interpreter)
ws=""; for w in .carry/whl_train/*.whl; do m=$(basename $w | cut -d- -f1); python -c "import $m" 2>/dev/null || ws="$ws $w"; done
[ -n "$ws" ] && python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $ws >$OUT/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
# the machine's `pip`/console scripts belong to another interpreter than `python` (no torch there)
olsm(){ python -m olsm.cli "$@"; }; export -f olsm
olsm train --help >/dev/null || { echo "olsm does not import here"; python -c "import olsm.train.cli"; exit 1; }
python -c "import torch,triton,sys,sympy;print(torch.__version__,triton.__version__,sys.version.split()[0],sympy.__version__,torch.cuda.get_device_name())" >$OUT/env.txt 2>&1
R=${R:-/tmp/r}; mkdir -p $R/logs
DEV=${DEV:-cuda}
M="--steps ${MSTEPS:-500} --batch-size 128 --lr 3e-3 --warmup 25 --train-configs 64:4,128:8,256:16 --eval-configs 64:4,128:8,256:16,256:32 --eval-every 250 --checkpoint-every 250 --no-progress --device $DEV --out $R/mqar"
L="--steps ${LSTEPS:-600} --batch-size 32 --seq-len 256 --d-model 128 --n-layers 4 --num-heads 2 --lr 2e-3 --eval-every 100 --checkpoint-every 300 --no-progress --device $DEV ${LEXTRA:-}"
# backend auto (Triton); a run that fails is resumed from its checkpoint with backend torch
mq(){ for o in longhorn longhorn_diag gated_longhorn deltanet gated_deltanet mamba2 mamba1 gla linear_attention; do
  olsm train mqar -o $o --d-model $1 --num-heads $2 $M || olsm train mqar -o $o --d-model $1 --num-heads $2 $M --backend torch || return 1; done; }
lm(){ for o in longhorn longhorn_diag gated_deltanet mamba2 mamba1; do
  olsm train lm -o $o $L --out $R/lm || olsm train lm -o $o $L --out $R/lm --backend torch || return 1; done
  for o in longhorn_diag mamba1; do
  olsm train lm -o $o --block longhorn $L --out $R/lmblock || olsm train lm -o $o --block longhorn $L --out $R/lmblock --backend torch; done; }
export -f mq lm; export M L R
T=${T:-240}
timeout $T bash -c "mq 64 1" >$R/logs/mq64.log 2>&1 &
timeout $T bash -c "mq 128 2" >$R/logs/mq128.log 2>&1 &
timeout $T bash -c "mq 256 4" >$R/logs/mq256.log 2>&1 &
timeout $T bash -c lm >$R/logs/lm.log 2>&1 &
wait
for d in mqar lm lmblock; do olsm train summarize $R/$d >$OUT/$d.txt 2>&1; done
cp $R/mqar/accuracy_vs_dmodel.png $OUT/; cp $R/lm/val_curves.png $OUT/lm_val_curves.png
(cd $R && tar czf $OUT/results.tgz --exclude=checkpoint.pt .)
cat $OUT/env.txt $OUT/*.txt; grep -h -i -E "error|warn" $R/logs/*.log | sort | uniq -c | head -20

#!/usr/bin/env bash
# GPU session for the matrix kernels (issue 4): GPU tests of the delta form, then a kernel profile
# and the benchmark against FLA. Run from the repository root on the GPU machine with .whl (the
# FLA 0.6.0 wheel, DESIGN §7) carried; results go to $OUT/matrix.tgz. Two calls fit one 10-minute
# command each:
#   BENCH=0 bash benchmarks/gpu_matrix.sh          (about 5 min of compiles)
#   QUICK=1 BENCH=0 TESTS= [PLAN="deltanet:recompute+fp32dots:bwd ..."] bash benchmarks/gpu_matrix.sh
#                                                     (quick A/B of the opt-in switches, no FLA, ~1 min)
#   QUICK=1 BASELINE=base.tar BENCH=0 TESTS= PLAN="..." bash benchmarks/gpu_matrix.sh
#                                                     (the same plan also on an older commit, back to back:
#                                                      `git archive -o base.tar <commit>` here, carry base.tar)
#   SANITIZE=1 BENCH=0 TESTS= bash benchmarks/gpu_matrix.sh   (compute-sanitizer memcheck of the matrix and
#                                                              elementwise kernels, 29 cases, about 9 min)
#   TESTS= [METHODS="deltanet longhorn gated_deltanet linear_attention"] [VARIANTS="new run8 fp32dots recompute levels2"] bash benchmarks/gpu_matrix.sh
set -u
R=/tmp/matrix_results; mkdir -p $R
P=$(dirname "$(python3 -c 'import sys; print(sys.executable)')"); export PATH=$P:$PATH PYTHONUNBUFFERED=1
python -m pip install --no-deps --no-build-isolation -e . > $R/pip.log 2>&1
python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >> $R/pip.log 2>&1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > $R/gpu.txt 2>&1
if [ "${QUICK:-0}" = 1 ]; then
    # with a baseline both runs share the command's 10 minutes
    timeout $([ -n "${BASELINE:-}" ] && echo 250 || echo 400) python -u benchmarks/quick_ab.py ${PLAN:-} > $R/quick_ab.log 2>&1
    tar czf $OUT/matrix.tgz -C $R .
    if [ -n "${BASELINE:-}" ]; then
        # the older tree imported in place of this one (olsm.kernels / olsm.objectives are mapped
        # folders in the editable install, so the baseline gets them as links)
        B=/tmp/baseline; mkdir -p $B && tar xf "$BASELINE" -C $B
        ln -sfn ../kernels $B/olsm/kernels; ln -sfn ../objectives $B/olsm/objectives
        (cd $B && PYTHONPATH=$B timeout 250 python -u benchmarks/quick_ab.py ${PLAN:-}) > $R/quick_ab_baseline.log 2>&1
        grep -v "first call" $R/quick_ab_baseline.log
    fi
    tar czf $OUT/matrix.tgz -C $R .
    grep -v "first call" $R/quick_ab.log
fi
if [ "${SANITIZE:-0}" = 1 ]; then
    timeout 560 python -u benchmarks/sanitize_kernels.py --out $R/sanitizer.txt > $R/sanitizer.log 2>&1
    tar czf $OUT/matrix.tgz -C $R .
    cat $R/sanitizer.txt
fi
if [ -n "${TESTS-chunk_delta or fp32_dots or split}" ]; then
    (cd tests && timeout 540 python -m pytest -q -s -p no:cacheprovider test_triton_matrix_gpu.py -k "${TESTS-chunk_delta or fp32_dots or split}" \
        > $R/gpu_tests.log 2>&1; echo "gpu tests rc=$?" >> $R/gpu_tests.log)
    tar czf $OUT/matrix.tgz -C $R .
    grep -E "^chunk_delta|passed|failed|rc=" $R/gpu_tests.log | cut -c1-240
fi
if [ "${BENCH:-1}" = 1 ]; then
    timeout 90 python -u benchmarks/profile_ops.py --methods deltanet --variant new --top 10 > $R/profile.md 2>&1
    PYTHONPATH=/tmp/site timeout 420 python -u benchmarks/bench_matrix.py --budget-s 360 \
        --methods ${METHODS:-deltanet longhorn linear_attention mamba2 gated_deltanet gla dplr sdpa} --variants ${VARIANTS:-new} --out $R \
        > $R/bench.log 2>&1
    tar czf $OUT/matrix.tgz -C $R .
    grep -E "^##|^\| _" $R/profile.md
    grep -E "ratio|device" $R/bench.log | tail -12
fi

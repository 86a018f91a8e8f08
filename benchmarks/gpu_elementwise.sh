#!/usr/bin/env bash
# One GPU session for the elementwise scan (issue 5): GPU tests, tile sweep, benchmark.
# Run from the repository root on the GPU machine with .carry/longhorn_ss and .carry/mamba_ss
# carried; results go to $OUT/elementwise.tgz (the device tool returns few files).
#   [KINDS=bwd] [CHUNKS=8,32,128] [SLABS=registers,registers:8] bash benchmarks/gpu_elementwise.sh [quick]
# (KINDS: kernels to sweep, none if empty; GRID: explicit sweep grid, see sweep_elementwise.configs;
#  CHUNKS: checkpoint intervals also timed; SLABS: backward slabs also timed, see bench --slabs)
set -u
R=/tmp/ew_results; mkdir -p $R
P=$(dirname "$(python3 -c 'import sys; print(sys.executable)')"); export PATH=$P:$PATH PYTHONUNBUFFERED=1
python -m pip install --no-deps --no-build-isolation -e . > $R/pip.log 2>&1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > $R/gpu.txt 2>&1
# peer CUDA builds (minutes of nvcc) in the background, niced below the Triton compiles
nice -n 5 python benchmarks/bench_elementwise.py --build-only longhorn > $R/build_longhorn.log 2>&1 &
nice -n 5 python benchmarks/bench_elementwise.py --build-only mamba > $R/build_mamba.log 2>&1 &
# compile the sweep's kernels in parallel processes while the GPU tests run
KINDS=${KINDS-fwd,bwd}
warm=()
[ -n "$KINDS" ] && for i in $(seq 0 11); do python benchmarks/sweep_elementwise.py --kinds $KINDS --grid "${GRID:-}" --warm $i/12 > $R/warm$i.log 2>&1 & warm+=($!); done
timeout 400 python -m pytest -q -p no:cacheprovider tests/test_triton_elementwise.py -k gpu > $R/gpu_tests.log 2>&1
echo "gpu tests rc=$?" >> $R/gpu_tests.log
[ ${#warm[@]} -gt 0 ] && wait "${warm[@]}"
tar czf $OUT/elementwise.tgz -C $R . 2>/dev/null
[ -n "$KINDS" ] && timeout 240 python -u benchmarks/sweep_elementwise.py --kinds $KINDS --grid "${GRID:-}" --out $R > $R/sweep.log 2>&1
tar czf $OUT/elementwise.tgz -C $R . 2>/dev/null
timeout 300 python -u benchmarks/bench_elementwise.py --out $R --tiles $R/elementwise_sweep.json \
    --peer-wait 300 --no-torch --chunk-sizes "${CHUNKS:-}" --slabs "${SLABS:-}" ${1:+--quick} > $R/bench.log 2>&1
tar czf $OUT/elementwise.tgz -C $R .
tail -5 $R/gpu_tests.log; tail -30 $R/bench.log

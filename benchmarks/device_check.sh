#!/usr/bin/env bash
# The GPU measurements in one call of the device tool (a few minutes on an H200): the CUDA test,
# run_cost.py (whole-epoch ratios of the presets against IVON and Adam, issue 22, with the peak
# memory of an M = 50 step), ResNet-18's per-iteration cost and peak memory at M = 1 and 10
# (iteration_time.py), step_cost.py with curvature every step (expand, reduce; with peak memory
# and the predictive; KFAC-VI(10) against ten sequential one-sample steps) and amortised
# (reduce), and conv_strategies.py. From the repository root:
#
#   echo /.whl/ >> .git/info/exclude      # once: the device image lacks pyro-ppl
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl pyro-ppl==1.9.2 pyro-api==0.1.2
#   device run: command "bash benchmarks/device_check.sh", carry [".whl"]
#
# Output (10 files) in $OUT, or ./device-check here; DEVICE=cpu runs the same on the CPU.
set -uo pipefail
OUT="$(mkdir -p "${OUT:-device-check}" && cd "${OUT:-device-check}" && pwd)"
DEVICE="${DEVICE:-cuda}"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/test-cuda.txt"
cd benchmarks
python3 run_cost.py --device "$DEVICE" --steps 157 --memory --json "$OUT/run-cost-$DEVICE.json" 2>&1 \
    | tee "$OUT/run-cost-$DEVICE.txt"
python3 iteration_time.py --model resnet18 --samples 1,10 --device "$DEVICE" 2>&1 | tee "$OUT/iteration-time-resnet18-$DEVICE.txt"
for approx in expand reduce; do
    python3 step_cost.py --device "$DEVICE" --repeats 10 --split-damping --kfac-approx "$approx" --predictive-rounds 1 \
        --json "$OUT/step-cost-$DEVICE-$approx.json" 2>&1 | tee "$OUT/step-cost-$DEVICE-$approx.txt"
done
python3 step_cost.py --device "$DEVICE" --repeats 10 --samples 1,10 --curvature-every 10 --inverse-every 100 \
    --split-damping --kfac-approx reduce --no-memory --predictive-rounds 0 \
    --json "$OUT/step-cost-$DEVICE-amortised-reduce.json" > /dev/null 2>&1
python3 conv_strategies.py --device "$DEVICE" --repeats 3 2>&1 | tee "$OUT/conv-strategies-$DEVICE.txt"

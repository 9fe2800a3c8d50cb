#!/usr/bin/env bash
# Device-side driver for the GPU machine (no package registry there): stage what was carried (bench/gpu_stage.sh),
# then run the named steps, logs under $OUT.
#   bash bench/gpu_session.sh env tests kernels smoke full
#   bash bench/gpu_session.sh w4tune w4test   (M = 1 W4A16 tune written into the table, copied to $OUT; its GPU test)
set -o pipefail
OUT=${OUT:-/tmp/qk-out}
mkdir -p "$OUT"
source bench/gpu_stage.sh  # wheels and data carried in .whl/ and .gpu/ -> /tmp/site
for step in "$@"; do
  echo "=== $step"
  case $step in
    env)
      nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv
      python3 -c "import torch, transformers, triton, modelopt; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, 'modelopt', modelopt.__version__, torch.cuda.get_device_name())" 2>&1 | grep -v WARN ;;
    tests)
      PYTHONPATH=$PWD/tests:$PYTHONPATH QUANTKIT_TEST_DEVICE=cuda timeout "${TESTS_TIMEOUT:-240}" python3 -m pytest tests/test_runtime.py -q -s -rs \
        -k "${TESTS_K:-not interpreter}" -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" \
        | grep -E "rel err|passed|failed|Error|error|assert|SKIP" | head -80 ;;
    w4tune)
      timeout "${W4TUNE_TIMEOUT:-330}" python3 bench/w4a16_tune.py --m "${W4TUNE_M:-1}" --write 2>&1 \
        | tee "$OUT/w4tune.log" | grep -v -E "WARN|warn" | tail -16
      cp quantkit/kernels/w4a16_configs.json "$OUT/" ;;
    w4test)
      QUANTKIT_TEST_DEVICE=cuda timeout "${TESTS_TIMEOUT:-240}" python3 -m pytest tests/test_w4a16_kernel.py -q -k cuda \
        -p no:cacheprovider 2>&1 | tee "$OUT/w4test.log" | tail -5 ;;
    kernels)
      timeout "${KERNELS_TIMEOUT:-200}" python3 bench/kernels.py --json "$OUT/kernels.json" 2>&1 \
        | tee "$OUT/kernels.log" | grep -v -E "WARN|warn" | tail -40 ;;
    smoke)
      timeout "${SMOKE_TIMEOUT:-200}" python3 bench/llama8b_speed.py --layers 4 --output-len 32 --repeats 1 \
        --json "$OUT/smoke.json" 2>&1 | tee "$OUT/smoke.log" | grep -v -E "WARN|warn|calibrate|Writing" | tail -30 ;;
    full)
      timeout "${FULL_TIMEOUT:-560}" python3 bench/llama8b_speed.py ${FULL_ARGS:-} --json "$OUT/llama8b.json" \
        --md "$OUT/RESULTS.md" 2>&1 | tee "$OUT/llama8b.log" | grep -v -E "WARN|warn|calibrate|Writing" | tail -40 ;;
  esac
done

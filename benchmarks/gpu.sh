#!/usr/bin/env bash
# The engines' GPU measurements (issue 28) in one run of about 8 minutes on a bare device machine:
# its own Python and CUDA torch, nothing installed (no TensorRT, no onnxruntime-gpu: their rows are
# left out), the project found through PYTHONPATH (set here to the repository root):
#
#     bash benchmarks/gpu.sh OUT_DIR
#
# Every step runs under its own `timeout` and writes its file in OUT_DIR when it ends, so a step that
# fails or runs out of time loses only its own figures; OUT_DIR/summary.txt lists each step's command,
# exit status (124: out of time) and seconds as they come:
#   machine.txt                  GPU, driver, Python, torch and CUDA versions
#   peak.json                    dense matmul peak, TFLOP/s: bf16, fp16, fp32 without TF32, TF32
#   bench-b32.json / .txt        rig bench, batch 32, 20 and 10 DDIM steps: the baseline (fp32 without
#                                TF32, eager, unfused, batch 1) and torch-fp32 (TF32), torch-fp32-unfused,
#                                torch-bf16-cl-graphs, torch-bf16-cl-compile, torch-bf16-cl-compile-graphs
#   bench-b1.json / .txt         the same at batch 1 (the compiled engines compile each batch size once)
#   train.json / .txt            stage-2 training steps/s per autocast precision (fp16, bf16, fp32)
#   gpu-tests.txt                the GPU tests of tests/test_engines.py and tests/test_fused.py
# The UNet's compiled code is cached in $RIG_HOME/cache/inductor (default /tmp/rig-gpu-home), which
# the two bench steps share. A dry run on a CPU, every step with the tiny preset (what the engines do
# there: no CUDA graphs; compiled in fp32):
#     PRESET=tiny DEVICE=cpu BATCH_LARGE=4 SCALE=3 bash benchmarks/gpu.sh /tmp/gpu-dry
# PRESET, DEVICE, BATCH_LARGE (32), BATCH_SMALL (1), ENGINES, TRAIN_BATCH (4), PYTHON (python3) and
# SCALE (multiplies every time limit, default 1) override the defaults.
set -uo pipefail

out=${1:?usage: bash benchmarks/gpu.sh OUT_DIR}
preset=${PRESET:-paper}
device=${DEVICE:-cuda}
large=${BATCH_LARGE:-32}
small=${BATCH_SMALL:-1}
train_batch=${TRAIN_BATCH:-4}
python=${PYTHON:-python3}
scale=${SCALE:-1}
if [[ $device == cuda* ]]; then
    engines=${ENGINES:-torch-fp32,torch-fp32-unfused,torch-bf16-cl-graphs,torch-bf16-cl-compile,torch-bf16-cl-compile-graphs}
else
    engines=${ENGINES:-torch-fp32,torch-fp32-unfused,torch-bf16,torch-fp32-compile}
fi
mkdir -p "$out"
out=$(realpath "$out")
[[ $python == */* ]] && python=$(realpath -s "$python") # -s: a venv's python is a symlink to keep
cd "$(dirname "$0")/.." || exit 1                       # the repository root
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export RIG_HOME=${RIG_HOME:-/tmp/rig-gpu-home}
started_all=$SECONDS
: >"$out/summary.txt"

step() { # step NAME SECONDS COMMAND...: run it under `timeout`, its console in NAME.txt, its status in summary
    local name=$1 limit=$(($2 * scale))
    shift 2
    echo "== $name (limit ${limit} s): $*" | tee -a "$out/summary.txt"
    local started=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.txt" 2>&1
    local status=$?
    echo "   exit $status after $((SECONDS - started)) s" | tee -a "$out/summary.txt"
}

bench() { # bench NAME BATCH SECONDS
    step "$1" "$3" "$python" -m rigcli bench --preset "$preset" --device "$device" --batch "$2" --steps 20,10 \
        --engines "$engines" --repeats 1 --calls 3 --json "$out/$1.json"
}

step machine 20 bash -c "nvidia-smi || lscpu; $python -c 'import sys, torch; print(sys.version); print(torch.__version__,
    torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else \"no CUDA\")'"
step peak 45 "$python" -c "
import json, sys, torch
from engines.bench import measure_peak
device = sys.argv[1]
names = ('bf16', 'fp16', 'fp32', 'tf32') if device.startswith('cuda') else ('fp32', 'bf16')
size = 8192 if device.startswith('cuda') else 1024
peaks = {p: round(measure_peak(device, p, size=size), 3) for p in names}
report = {'device': torch.cuda.get_device_name() if device.startswith('cuda') else 'cpu', 'torch': torch.__version__,
          'matrix': size, 'tflops': peaks}
open(sys.argv[2], 'w').write(json.dumps(report, indent=2) + '\n')
print(report)" "$device" "$out/peak.json"
bench bench-b32 "$large" 210
bench bench-b1 "$small" 120
step train 75 "$python" benchmarks/bench_train.py --preset "$preset" --device "$device" --batch "$train_batch" \
    --precisions fp16,bf16,fp32 --no-baseline --json "$out/train.json"
if [[ $device == cuda* ]]; then # the CPU's tests are CI's; these are the ones only a GPU runs
    step gpu-tests 100 "$python" -m pytest -v -rs -p no:cacheprovider tests/test_fused.py tests/test_engines.py \
        -k "cuda or gpu_engines or gpu_provider or trt_matches or (fp16_edit_stays and not cpu)"
else
    step gpu-tests 100 "$python" -m pytest -v -rs -p no:cacheprovider tests/test_engines.py -k "gpu_engines or auto_is"
fi
echo "all steps in $((SECONDS - started_all)) s; results in $out (summary.txt first)" | tee -a "$out/summary.txt"

#!/usr/bin/env bash
# Every GPU measurement of the engines issue, in one go, for whoever has an NVIDIA GPU:
#
#     bash benchmarks/gpu.sh OUT_DIR [ICT_FACEKIT]
#
# 1. the GPU tests (TensorRT and fp16 within 1e-2 per UNet call, a whole fp16 edit >= 35 dB
#    against fp32; CUDA graphs, torch.compile, ONNX Runtime's CUDA provider);
# 2. `rig bench` with the paper's UNet at batch 1, 8 and 32, 20 and 10 DDIM steps: torch fp32, fp16,
#    bf16 and fp16 channels-last with CUDA graphs, ONNX Runtime fp32 and fp16, TensorRT fp16;
# 3. training speed of the paper model (against the paper's V100: 5,000 steps at batch 4 in ~30 min);
# 4. the editing time of one photo and of a batch;
# 5. the fewer-steps quality study (50/20/10/5 DDIM steps) with the paper-sized model.
#
# Each step's output goes to OUT_DIR (JSON where the tool writes it, the console as .txt), and
# OUT_DIR/summary.txt lists each step's exit status: a step that fails does not stop the others.
# Install first, in the environment that runs it: torch's CUDA build, then
# `pip install -e '.[dev,gpu]'` (not [onnx] as well: onnxruntime and onnxruntime-gpu are one module,
# and the CPU one would hide the CUDA provider). TensorRT and onnxruntime-gpu are optional: without
# them their rows say skipped. Run it from anywhere; paths are taken relative to where you are. PRESET, DEVICE, BATCHES and TRAIN_STEPS override the defaults (paper,
# cuda, 1,8,32, 2000) for a dry run elsewhere, e.g.
# `PRESET=tiny DEVICE=cpu BATCHES=1,2 TRAIN_STEPS=20 bash benchmarks/gpu.sh /tmp/g`.
set -uo pipefail

out=${1:?usage: bash benchmarks/gpu.sh OUT_DIR [ICT FaceKit folder or zip]}
ict=${2:-../shared/assets/ict-facekit}
preset=${PRESET:-paper}
device=${DEVICE:-cuda}
batches=${BATCHES:-1,8,32}
train_steps=${TRAIN_STEPS:-2000}
python=${PYTHON:-python}
mkdir -p "$out"
out=$(realpath "$out")
ict=$(realpath -m "$ict")
[[ $python == */* ]] && python=$(realpath -s "$python") # -s: a venv's python is a symlink to keep
cd "$(dirname "$0")/.." || exit 1 # the repository root: tests/ and benchmarks/ are found from there
: >"$out/summary.txt"

step() {  # step NAME COMMAND...: run it, keep its console in NAME.txt, record its exit status
    local name=$1
    shift
    echo "== $name: $*" | tee -a "$out/summary.txt"
    local started=$SECONDS
    "$@" >"$out/$name.txt" 2>&1
    local status=$?
    echo "   exit $status after $((SECONDS - started)) s" | tee -a "$out/summary.txt"
}

step machine bash -c "nvidia-smi || lscpu; $python -c 'import torch; print(torch.__version__, torch.version.cuda)';
    $python -c 'import onnxruntime as o; print(o.__version__, o.get_available_providers())'"
step gpu-tests "$python" -m pytest -q -rs tests/test_engines.py
step bench "$python" -m rigcli bench --preset "$preset" --device "$device" --batch "$batches" --steps 20,10 \
    --engines torch-fp32,torch-fp16,torch-bf16,torch-fp16-cl-graphs,onnx,onnx-fp16,trt --json "$out/bench.json"
step train "$python" benchmarks/bench_train.py --preset "$preset" --device "$device" --batch 4
step edit "$python" benchmarks/bench_edit.py --preset "$preset" --device "$device" --ict "$ict"
step steps "$python" benchmarks/bench_steps.py --preset "$preset" --device "$device" --ict "$ict" \
    --train-steps "$train_steps"
echo "results in $out (summary.txt first)"

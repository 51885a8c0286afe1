#!/usr/bin/env bash
# GPU check: CUDA inference, AMP, batch size, throughput, memory, end to end. One run, figures to $OUT.
# SimpleITK, slicerio and pynrrd come from .device-carry/site.tar.xz or .whl/ (scripts/device_site.sh).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
source scripts/device_site.sh || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch,sys; print('python', sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name(), 'bf16', torch.cuda.is_bf16_supported())" | tee -a "$OUT/gpu.txt"
# 1. correctness on the GPU: the model/CAM/pipeline tests that need no Slicer.
python3 -m pytest -q -p no:cacheprovider Testing/test_model.py Testing/test_cam.py Testing/test_pipeline.py Testing/test_gpu.py 2>&1 | tail -5 | tee "$OUT/pytest.txt"
# 2. batch-size sweep for DADRN50 (forward + Grad-CAM, bf16, channels-last).
python3 -m DADRNLesionLib.bench --models dadrn50 --device cuda --no-naive --no-end-to-end --batch-size 64 --min-time 2 --json "$OUT/b64.json" | tail -2
python3 -m DADRNLesionLib.bench --models dadrn50 --device cuda --no-naive --no-end-to-end --batch-size 256 --min-time 2 --json "$OUT/b256.json" | tail -2
# 3. the full benchmark: both models, naive CAM, end to end on a 512x512x100 study, auto batch size.
python3 -m DADRNLesionLib.bench --models dadrn50 demo --device cuda --batch-size 128 --min-time 3 --slices 100 --json "$OUT/bench_gpu.json" | tee "$OUT/bench_gpu.txt"
python3 -m DADRNLesionLib.bench --models dadrn50 --device cuda --dtype float32 --no-naive --no-end-to-end --batch-size 128 --min-time 2 --json "$OUT/fp32.json" | tail -2
echo done

#!/usr/bin/env bash
# GPU readiness check: install the project on a machine with a CUDA GPU and measure ResNet-50 224 px
# fine-tuning (fp32 / bf16-mixed / + channels_last / + compile, against a minimal loop) and the data paths
# feeding it. Writes bench/results/gpu_cuda.csv. About 5 minutes; no network needed beyond pip's index.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-gpu
.venv-gpu/bin/pip install --quiet --disable-pip-version-check -e .
.venv-gpu/bin/python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'; print(torch.__version__, torch.cuda.get_device_name())"
cd bench
../.venv-gpu/bin/python gpu.py --device cuda "$@"

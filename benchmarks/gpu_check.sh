#!/usr/bin/env bash
# The prepared device run: the training table (SiT-B/2, L/2, XL/2; official-style, regdit,
# regdit + compile) and, with time left, the sampling table (benchmarks/RESULTS.md). About 8 minutes
# on an H100/H200.
# The device image has torch, timm, accelerate and safetensors; diffusers and torch-fidelity travel
# as wheels in the git-ignored .whl:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 \
#     -d .whl diffusers==0.42.1 importlib_metadata torch-fidelity
# then run it with `carry: [".whl"]`.
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
train="python3 benchmarks/bench_train.py --steps 10 --batch-size"
timeout 200 $train 64 --models SiT-XL/2 \
    --variants official,regdit,regdit+compile,regdit+checkpointing 2>&1 | tail -6
timeout 120 $train 64 --models SiT-L/2 2>&1 | tail -4
timeout 100 $train 128 --models SiT-B/2 2>&1 | tail -4
timeout 120 python3 benchmarks/bench_sample.py --model SiT-XL/2 --batch-size 32 --no-compile 2>&1 | tail -8
timeout 150 python3 benchmarks/bench_monitor.py --model SiT-XL/2 --batch-size 64 --images 128 2>&1 | tail -7

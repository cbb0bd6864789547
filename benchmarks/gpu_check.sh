#!/usr/bin/env bash
# One device run: training (and, with time left, sampling) throughput tables on the GPU (benchmarks/RESULTS.md).
# The device image has torch, timm, accelerate and safetensors; diffusers travels as a wheel in the git-ignored .whl:
#   echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
# then run it with `carry: [".whl"]`.
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
timeout 90 python3 benchmarks/bench_train.py --models SiT-XL/2 --batch-size 64 --steps 10 2>&1 | tail -4
timeout 90 python3 benchmarks/bench_train.py --models SiT-B/2 --batch-size 128 --steps 10 --compile 2>&1 | tail -5
timeout 120 python3 benchmarks/bench_sample.py --model SiT-XL/2 --batch-size 32 --no-compile 2>&1 | tail -12

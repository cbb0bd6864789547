#!/usr/bin/env bash
# One device run: training (and, with time left, sampling) throughput tables on the GPU (benchmarks/RESULTS.md).
# Needs the diffusers wheel carried in .whl (the device image has torch, timm, accelerate, safetensors).
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
timeout 90 python3 benchmarks/bench_train.py --models SiT-XL/2 --batch-size 64 --steps 10 2>&1 | tail -4
timeout 90 python3 benchmarks/bench_train.py --models SiT-B/2 --batch-size 128 --steps 10 --compile 2>&1 | tail -5
timeout 120 python3 benchmarks/bench_sample.py --model SiT-XL/2 --batch-size 32 --no-compile 2>&1 | tail -12

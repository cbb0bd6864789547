"""The benchmark scripts' CPU modes run and print their tables (speed is measured there, never
asserted here)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
NUMBER = r"\s+\d+(\.\d+)?"


@pytest.mark.slow
@pytest.mark.parametrize("script, flags, rows", [
    ("bench_train.py",
     ["--tiny", "--steps", "1", "--variants", "official,regdit,regdit+checkpointing+fp16+foreach"],
     [rf"SiT-S/8\s+{variant}{NUMBER}\s+\S+x"
      for variant in ("official", "regdit", r"regdit\+checkpointing\+fp16\+foreach")]),
    ("bench_sample.py", ["--tiny"],
     [rf"{variant}\s+{mode}{NUMBER}"
      for variant in ("official-style eager fp32", "regdit fp32", "regdit bf16")
      for mode in ("SDE 250", "ODE Heun 50")]),
    ("bench_data.py", ["--vae", "tiny", "--resolution", "32", "--num-images", "16",
                       "--one-at-a-time", "2", "--batch-size", "8", "--loader-batch-size", "8",
                       "--workers", "1"],
     [rf"{what}.*{NUMBER}" for what in ("prepare images", "official loop",
                                         r"prepare latents, official layout",
                                         "loader regdit-flip layout, 1 workers")]),
    ("bench_eval.py", ["--num-images", "4", "--batch-size", "2", "--resolution", "64"],
     [rf"Inception forward\s+4{NUMBER}{NUMBER} images/s"]),
    ("bench_monitor.py", ["--tiny"],
     [rf"sampling \(model \+ decode\)\s+8{NUMBER}{NUMBER}",
      rf"Inception features\s+8{NUMBER}{NUMBER}", r"one FID-10k evaluation: \d+\.\d min"]),
    ("bench_checksum.py", ["--tiny"],
     [rf"{kind} \(tensor_checksum\){NUMBER}{NUMBER}" for kind in ("crc32", "blake2b", "sha256")]
     + [rf"torch\.save \+ fsync{NUMBER}{NUMBER}", rf"torch\.load \(page cache\){NUMBER}{NUMBER}"]),
    ("bench_grace.py", ["--tiny"],
     [r"\| SiT-S/8, a real `regdit train` \(batch 2, CPU, \d+ cores\) \| \d+\.\d+ \| \d+\.\d+ \| "
      r"\d+\.\d+ \|", r"\| SiT-XL/2 state x 0\.001 \(0\.01 GB\): to_host \d+\.\d s \+ "
      r"save_checkpoint \d+\.\d s \| - \| \d+\.\d \+ 2 steps \| - \|"]),
])
def test_cpu_mode_prints_its_table(script, flags, rows):
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), *flags], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    for row in rows:
        assert re.search(row, result.stdout), f"no row {row!r} in:\n{result.stdout}"


@pytest.mark.slow
def test_bad_variant_is_refused():
    result = subprocess.run([sys.executable, str(BENCHMARKS / "bench_train.py"), "--tiny",
                             "--variants", "regdit+fast"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "unknown variant 'regdit+fast'" in result.stderr

"""The README's Python API example runs as written, on a tiny pixel-space REG checkpoint in place of
the demo's."""
import re
from pathlib import Path

import pytest
import torch

from regdit.core.models import SiT, SiTConfig

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_python_api_example_runs(tmp_path, monkeypatch):
    code = re.search(r"## Python API.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    config = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2,
                  num_classes=10, z_dims=[16], projector_dim=32, encoder_depth=1)
    torch.save({"ema": SiT(SiTConfig(**config)).state_dict(), "model_config": config,
                "latents": {"vae": "none"}}, tmp_path / "tiny.pt")
    code, replaced = re.subn(r'ckpt = ".*?"', 'ckpt = "tiny.pt"', code)
    assert replaced == 1
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(code, scope)
    assert scope["velocity"].shape == scope["x"].shape == (4, 3, 8, 8) \
        and scope["cls_velocity"].shape == (4, 16)
    assert scope["ode"].shape == scope["sde"].shape == (4, 3, 8, 8)
    assert scope["npz"].is_file() and len(list(scope["npz"].with_suffix("").glob("*.png"))) == 8

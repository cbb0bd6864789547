"""`--plugin FILE_OR_MODULE`: a researcher's own file registers a sampler, a loss term, a time
distribution and an encoder, which train (with previews by the sampler), resume and sample through
the real command line; the run records it."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import yaml
from conftest import cli_error
from test_extensions import train_argv

from regdit.commands.cli import main
from regdit.core.interpolants import TIME_DISTRIBUTIONS
from regdit.core.loss import LOSS_TERMS
from regdit.core.samplers import SAMPLERS
from regdit.run.plugins import LOADED
from regdit.storage.checkpoint import load_checkpoint
from regdit.storage.encoders import ENCODER_TYPES, FAMILIES, save_random_encoder

PLUGIN = '''
"""An encoder, a loss term, a time distribution and a sampler of one's own."""
import torch

from regdit.storage.encoders import (ENCODER_TYPES, FAMILIES, EncoderSpec, Family,
                                     save_random_encoder)
from regdit.core.interpolants import TIME_DISTRIBUTIONS
from regdit.core.loss import LOSS_TERMS, mean_flat
from regdit.core.samplers import SAMPLERS, euler_sampler

FAMILIES["toy"] = Family(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resized=False)
ENCODER_TYPES["toy-vit"] = EncoderSpec("toy", "vit_small_patch16_224", 24)
LOSS_TERMS["velocity_l1"] = lambda out: mean_flat((out["velocity"] - out["target"]).abs().float())


def logit_normal(n, path_type, device=None, generator=None):
    """t = sigmoid(N(0, 1)), SD3's training distribution."""
    return torch.sigmoid(torch.randn(n, device=device, generator=generator))


TIME_DISTRIBUTIONS["logit_normal"] = logit_normal


def flipped_euler(model, latents, cls_latents, y, num_steps=5, **kwargs):
    """Euler steps, the image mirrored at the end: recognisable in the samples."""
    return torch.flip(euler_sampler(model, latents, cls_latents, y, num_steps, **kwargs), [-1])


SAMPLERS["flipped-euler"] = flipped_euler
'''


@pytest.fixture
def plugin(tmp_path):
    """The plugin file; what it registers is taken out of the tables again afterwards."""
    path = tmp_path / "my_idea.py"
    path.write_text(textwrap.dedent(PLUGIN))
    tables = [(table, dict(table))
              for table in (ENCODER_TYPES, FAMILIES, LOSS_TERMS, SAMPLERS, TIME_DISTRIBUTIONS)]
    loaded = list(LOADED)
    yield path
    for table, before in tables:
        table.clear()
        table.update(before)
    LOADED[:] = loaded


def regdit(*argv):
    """`regdit ARGV` in a process of its own (a fresh interpreter: no plugin loaded)."""
    return subprocess.run([sys.executable, "-m", "regdit", *map(str, argv)], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_a_plugin_file_trains_resumes_and_samples(tiny_data, tmp_path, plugin, capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--plugin", str(plugin), "--help"])
    assert "flipped-euler" in capsys.readouterr().out  # its sampler is a choice of --sampler
    encoder = save_random_encoder("toy-vit", tmp_path / "toy", patch_size=8, embed_dim=24, grid=4)
    flags = ["--enc-type", "toy-vit", "--enc-path", str(encoder)]
    main(train_argv(tiny_data, "plugged", "--plugin", str(plugin), *flags,
                    "--extra-terms", "velocity_l1=0.1", "--weighting", "logit_normal",
                    "--sampling-steps", "2", "--preview-sampler", "flipped-euler"))
    exp = tiny_data / "exps" / "plugged"
    assert (exp / "samples" / "0000002.png").is_file()  # a preview by the plugin's sampler
    assert load_checkpoint(exp / "checkpoints" / "0000002.pt")["plugins"] == [str(plugin)]
    assert yaml.safe_load((exp / "config.yaml").read_text())["plugin"] == [str(plugin)]

    # without the plugin, a resume and a sample name it
    for argv in (train_argv(tiny_data, "plugged", *flags, "--max-train-steps", "3"),
                 ["sample", "--ckpt", exp / "checkpoints" / "0000002.pt", "--sample-dir",
                  tmp_path / "refused"]):
        refused = regdit(*argv)
        assert refused.returncode == 1 and refused.stderr.strip().endswith(
            f"was trained with plugins that are not loaded: pass --plugin {plugin}"), refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "refused").exists()

    # with it, the run continues (the term is logged) and samples with the plugin's sampler
    main(train_argv(tiny_data, "plugged", "--plugin", str(plugin), *flags,
                    "--extra-terms", "velocity_l1=0.1", "--weighting", "logit_normal",
                    "--sampling-steps", "2", "--preview-sampler", "flipped-euler",
                    "--max-train-steps", "3"))
    lines = [json.loads(line) for line in (exp / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3] and lines[-1]["velocity_l1"] > 0
    config = tmp_path / "sample.yaml"  # the plugin named in a --config file
    config.write_text(yaml.safe_dump({"plugin": str(plugin), "num_fid_samples": 4,
                                      "per_proc_batch_size": 4, "num_steps": 2}))
    sampled = {}
    for sampler in ("flipped-euler", "ode"):
        result = regdit("sample", "--config", config, "--ckpt", exp / "checkpoints" / "0000003.pt",
                        "--sampler", sampler, "--sample-dir", tmp_path / sampler)
        assert result.returncode == 0, result.stderr
        (npz,) = (tmp_path / sampler).glob("*.npz")
        sampled[sampler] = np.load(npz)["arr_0"]
    # the plugin's sampler drew the ODE's images mirrored
    assert np.array_equal(sampled["flipped-euler"], sampled["ode"][:, :, ::-1])


def test_plugin_refusals_are_one_line(tmp_path, capsys, plugin):
    assert cli_error(capsys, ["sample", "--plugin", str(tmp_path / "missing.py")]) == (
        f"regdit sample: error: --plugin {tmp_path / 'missing.py'}: no such file")
    assert "--plugin no_such_module_here: no module 'no_such_module_here' on the Python path" in \
        cli_error(capsys, ["eval", "--plugin", "no_such_module_here"])
    broken = tmp_path / "broken.py"
    broken.write_text("import math\nmath.sqrt(-1)\n")
    assert cli_error(capsys, ["train", "--plugin", str(broken)]) == (
        f"regdit train: error: --plugin {broken} failed: ValueError: math domain error ({broken}, "
        "line 2)")
    config = tmp_path / "config.yaml"
    config.write_text("plugin: {a: 1}\n")
    assert "plugin must be a file or module name, or a list of them" in cli_error(
        capsys, ["sample", "--config", str(config)])

"""Bounds that are written down: values past them are one line before anything is written."""
import json
import shutil

import numpy as np
import pytest
from conftest import cli_error
from PIL import Image

from regdit import RegditError
from regdit.config import read_yaml
from regdit.core.loss import LOSS_TERMS
from regdit.storage.data import open_dataset


def test_eval_samples_have_a_documented_upper_bound(capsys):
    assert cli_error(capsys, ["train", "--eval-samples", str(2**63)]) \
        == f"regdit train: error: --eval-samples {2**63}: must be at least 4 and at most 50000"


def test_labels_from_2_to_the_31_are_refused_at_prepare_images(tmp_path, capsys):
    """`prepare images` accepted 2**63 and `prepare latents` crashed on it."""
    (tmp_path / "raw" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "raw" / "a" / "0.png")
    (tmp_path / "raw" / "dataset.json").write_text(json.dumps({"labels": [["a/0.png", 2**31]]}))
    line = cli_error(capsys, ["prepare", "images", "--source", str(tmp_path / "raw"), "--dest",
                              str(tmp_path / "images"), "--resolution", "8", "--workers", "0"])
    assert line.endswith(f"raw/dataset.json: label {2**31} of a/0.png: labels must be integers "
                         "from 0 to 2**31 - 1; fix it or remove dataset.json to label by folder "
                         "name"), line
    assert not (tmp_path / "images").exists()


@pytest.mark.parametrize("terms,message", [
    (["velocity_l1=1", "velocity_l1=2"], "--extra-terms velocity_l1=2: velocity_l1 is given twice; "
                                         "give each term once"),
    (["velocity_l1=-0.5"], "--extra-terms velocity_l1=-0.5: must be NAME=WEIGHT with NAME one of "
                           "velocity_l1 and a finite WEIGHT of at least 0 (a plugin's term needs "
                           "its --plugin)"),
], ids=["duplicate", "negative"])
def test_extra_terms_given_twice_or_with_a_negative_weight_are_refused(terms, message, capsys,
                                                                      monkeypatch):
    monkeypatch.setitem(LOSS_TERMS, "velocity_l1", lambda outputs: outputs["velocity"].abs())
    line = cli_error(capsys, ["train", "--extra-terms", *terms])
    assert line == f"regdit train: error: {message}"


@pytest.mark.parametrize("text,message", [
    ("eval:\n  a: 1\nseed: 0\nseed: 1\n", r"line 4: seed is given twice; give each key once"),
    ("nested:\n  a: 1\n  a: 2\n", r"line 3: a is given twice; give each key once"),
])
def test_yaml_keys_given_twice_are_refused(tmp_path, text, message):
    """PyYAML keeps the last of two equal keys silently."""
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(RegditError, match=f"^config file {tmp_path}/c.yaml {message}$"):
        read_yaml(tmp_path / "c.yaml", "config file")


def test_a_setting_spelled_twice_in_a_config_file_is_refused(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("cfg-scale: 1.5\ncfg_scale: 4\n")
    assert cli_error(capsys, ["sample", "--config", str(tmp_path / "c.yaml")]) \
        == (f"regdit sample: error: config file {tmp_path}/c.yaml gives cfg_scale twice "
            "(cfg-scale, cfg_scale): give each setting once")


def test_a_data_folder_with_two_layouts_is_refused_naming_both(tiny_data, tmp_path):
    """A regdit dataset with an official one beside it: which one training reads was a guess."""
    shutil.copytree(tiny_data / "data", tmp_path / "data")
    (tmp_path / "data" / "vae-sd").mkdir()
    with pytest.raises(RegditError, match=r"data holds 2 dataset layouts, regdit \(regdit.json\) "
                                          r"and official \(vae-sd/\): move one into a folder of "
                                          r"its own and pass the folder of the one to use$"):
        open_dataset(tmp_path / "data")

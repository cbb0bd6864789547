import json
import re

import pytest
import torch
from conftest import FIXTURES

from regdit import RegditError
from regdit.checkpoint import (
    build_model_from_checkpoint,
    load_checkpoint,
    load_state_dict_checked,
    model_config_from_checkpoint,
    save_checkpoint,
)
from regdit.cli import main as cli_main


def test_official_checkpoint_loads_with_weights_only(official_tiny):
    _, io = official_tiny
    checkpoint = load_checkpoint(FIXTURES / "official_tiny_a_ckpt.pt")
    assert set(checkpoint) == {"model", "ema", "opt", "args", "steps"} and checkpoint["steps"] == 1
    model = build_model_from_checkpoint(checkpoint, "fixture", num_heads=4).eval()
    with torch.no_grad():
        out = model(io["x"], io["t"], io["y"], cls_token=io["cls_token"])[0]
    torch.testing.assert_close(out, io["out"], atol=1e-5, rtol=0)
    assert model_config_from_checkpoint(checkpoint, num_heads=4).encoder_depth == 2  # from the saved args


def test_official_checkpoint_loads_after_a_library_resets_the_allow_list(official_tiny):
    torch.serialization.clear_safe_globals()  # accelerate's `load` does this as a side effect
    assert load_checkpoint(FIXTURES / "official_tiny_a_ckpt.pt")["steps"] == 1


def test_truncated_checkpoint_gives_one_line_error(tmp_path):
    data = (FIXTURES / "official_tiny_a_ckpt.pt").read_bytes()
    broken = tmp_path / "broken.pt"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(RegditError, match=r"broken.pt is unreadable .*truncated or corrupt") as error:
        load_checkpoint(broken)
    assert "\n" not in str(error.value)
    with pytest.raises(RegditError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "0000100.pt").write_bytes(data)
    with pytest.raises(RegditError, match=r"run is a folder: pass .*run/checkpoints/0000100.pt$"):
        load_checkpoint(tmp_path / "run")


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"ema": {}, "payload": object()}, path)  # not allow-listed: weights_only refuses it
    with pytest.raises(RegditError, match="unreadable"):
        load_checkpoint(path)


@pytest.mark.parametrize("override,hint", [({"z_dims": [16]}, "--cls / --projector-embed-dims"),
                                           ({"use_cls_token": False}, "--cls"),
                                           ({"depth": 3}, "--model"),
                                           ({"hidden_size": 32}, "--model"),
                                           ({"patch_size": 4}, "--model"),
                                           ({"input_size": 16}, "--resolution"),
                                           ({"qk_norm": True}, "--qk-norm"),
                                           ({"num_classes": 20}, "--num-classes")])
def test_mismatched_settings_name_the_flag(official_tiny, override, hint):
    checkpoint, _ = official_tiny
    with pytest.raises(RegditError, match=f"check {re.escape(hint)}") as error:
        build_model_from_checkpoint(checkpoint, "ckpt.pt", num_heads=4, **override)
    assert "ckpt.pt does not match the model" in str(error.value) and "\n" not in str(error.value)


def test_atomic_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "0001000.pt"
    save_checkpoint({"ema": {}, "steps": 1}, path)

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint({"ema": {}, "steps": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["steps"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["0001000.pt"]  # no temp file left behind


def test_export_to_safetensors_round_trip(official_tiny, tmp_path):
    checkpoint, io = official_tiny
    cli_main(["export", str(FIXTURES / "official_tiny_a_ckpt.pt"), "--output", str(tmp_path / "export"),
              "--num-heads", "4"])
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["model"]["z_dims"] == [32] and config["model"]["use_cls_token"] is True
    assert config["path_type"] == "linear"  # from the official args, for sampling
    exported = load_checkpoint(tmp_path / "export" / "model.safetensors")
    model = build_model_from_checkpoint(exported, "export").eval()
    for k, v in checkpoint["ema"].items():
        assert torch.equal(model.state_dict()[k], v)


def test_legacy_decoder_blocks_are_renumbered(official_tiny):
    checkpoint, _ = official_tiny
    from regdit.checkpoint import convert_legacy_state_dict
    legacy = {(f"decoder_blocks.{int(k.split('.')[1]) - 2}." + k.split(".", 2)[2]
               if k.startswith("blocks.") and int(k.split(".")[1]) >= 2 else k): v
              for k, v in checkpoint["ema"].items()}
    assert "decoder_blocks.0.attn.qkv.weight" in legacy
    converted = convert_legacy_state_dict(legacy, encoder_depth=2)
    assert converted.keys() == checkpoint["ema"].keys()
    assert all(torch.equal(converted[k], v) for k, v in checkpoint["ema"].items())
    legacy_checkpoint = {**checkpoint, "ema": legacy}  # the saved args give encoder_depth 2
    model = build_model_from_checkpoint(legacy_checkpoint, "old.pt", num_heads=4, legacy=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in checkpoint["ema"].items())
    with pytest.raises(RegditError, match="early REPA layout \\(decoder_blocks\\): pass --legacy"):
        build_model_from_checkpoint(legacy_checkpoint, "old.pt", num_heads=4)
    with pytest.raises(RegditError, match="old.pt does not match the model: .*check --legacy"):
        load_state_dict_checked(model, legacy, "old.pt")

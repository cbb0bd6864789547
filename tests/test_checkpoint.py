import argparse
import json
import random
import re
import struct
import zipfile

import pytest
import torch
from conftest import FIXTURES

from regdit import RegditError
from regdit.commands.cli import main as cli_main
from regdit.storage.checkpoint import (
    build_model_from_checkpoint,
    load_checkpoint,
    load_state_dict_checked,
    model_config_from_checkpoint,
    save_checkpoint,
    tensor_checksum,
)


def test_official_checkpoint_loads_with_weights_only(official_tiny):
    _, io = official_tiny
    checkpoint = load_checkpoint(FIXTURES / "official_tiny_a_ckpt.pt")
    assert set(checkpoint) == {"model", "ema", "opt", "args", "steps"} and checkpoint["steps"] == 1
    model = build_model_from_checkpoint(checkpoint, "fixture", num_heads=4).eval()
    with torch.no_grad():
        out = model(io["x"], io["t"], io["y"], cls_token=io["cls_token"])[0]
    torch.testing.assert_close(out, io["out"], atol=1e-5, rtol=0)
    # from the saved args
    assert model_config_from_checkpoint(checkpoint, num_heads=4).encoder_depth == 2


def test_official_checkpoint_loads_after_a_library_resets_the_allow_list(official_tiny):
    torch.serialization.clear_safe_globals()  # accelerate's `load` does this as a side effect
    assert load_checkpoint(FIXTURES / "official_tiny_a_ckpt.pt")["steps"] == 1


def test_truncated_checkpoint_gives_one_line_error(tmp_path):
    data = (FIXTURES / "official_tiny_a_ckpt.pt").read_bytes()
    broken = tmp_path / "broken.pt"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(RegditError,
                       match=r"broken.pt is unreadable .*truncated or corrupt") as error:
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


@pytest.mark.parametrize("override,hint", [({"z_dims": [16]}, "--cls-dim / --z-dims"),
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
    cli_main(["export", str(FIXTURES / "official_tiny_a_ckpt.pt"),
              "--output", str(tmp_path / "export"), "--num-heads", "4"])
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["model"]["z_dims"] == [32] and config["model"]["use_cls_token"] is True
    assert config["path_type"] == "linear"  # from the official args, for sampling
    exported = load_checkpoint(tmp_path / "export" / "model.safetensors")
    model = build_model_from_checkpoint(exported, "export").eval()
    for k, v in checkpoint["ema"].items():
        assert torch.equal(model.state_dict()[k], v)


def test_legacy_decoder_blocks_are_renumbered(official_tiny):
    checkpoint, _ = official_tiny
    from regdit.storage.official import convert_legacy_state_dict
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


def flip_bytes(path, offset, count=8):
    """Invert `count` bytes of the file at `offset`, in place (bit rot, a bad copy)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(count)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def tensor_data_offset(path):
    """(offset, size) of the raw bytes of the largest tensor storage in a torch.save zip (`*/data/N`
    entries)."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename),
                   key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        # the local file header is 30 bytes
        name_length, extra_length = struct.unpack("<HH", f.read(30)[26:30])
    return info.header_offset + 30 + name_length + extra_length, info.file_size


def test_saved_checkpoint_records_a_checksum_that_load_verifies(official_tiny, tmp_path):
    checkpoint, _ = official_tiny
    path = tmp_path / "0000001.pt"
    save_checkpoint(checkpoint, path)
    with torch.serialization.safe_globals([argparse.Namespace]):
        raw = torch.load(path, weights_only=True)
    assert raw["checksum"] == tensor_checksum(checkpoint) \
        and re.fullmatch(r"crc32:[0-9a-f]{8}", raw["checksum"])
    loaded = load_checkpoint(path)
    # the checksum is removed: load returns what was saved
    assert loaded.keys() == checkpoint.keys()
    assert all(torch.equal(loaded["opt"]["state"][i]["exp_avg"], s["exp_avg"])
               for i, s in checkpoint["opt"]["state"].items())


def test_checksum_covers_names_dtypes_shapes_and_every_tensor():
    a, b = torch.arange(6, dtype=torch.float32), torch.ones(6)
    base = tensor_checksum({"x": a, "y": b, "s": [torch.tensor(3.0)], "n": 1})
    assert base == tensor_checksum({"n": 2, "s": (torch.tensor(3.0),), "y": b.clone(),
                                    "x": a.clone()})  # key order
    for changed in ({"x": b, "y": a, "s": [torch.tensor(3.0)]},  # swapped
                    {"x": a.reshape(2, 3), "y": b, "s": [torch.tensor(3.0)]},  # reshaped
                    # same bytes, another dtype
                    {"x": a.view(torch.int32), "y": b, "s": [torch.tensor(3.0)]},
                    {"x": a, "z": b, "s": [torch.tensor(3.0)]},  # renamed
                    # a 0-dim tensor in a list (AdamW's step)
                    {"x": a, "y": b, "s": [torch.tensor(4.0)]}):
        assert tensor_checksum(changed) != base
    bf16 = {"w": torch.randn(4, 4).bfloat16().t()}  # no numpy dtype, not contiguous
    assert tensor_checksum(bf16) == tensor_checksum({"w": bf16["w"].contiguous()})
    assert tensor_checksum(bf16, "sha256").startswith("sha256:")


def test_bytes_changed_inside_a_tensor_are_caught(official_tiny, tmp_path):
    path = tmp_path / "0000001.pt"
    save_checkpoint(official_tiny[0], path)
    offset, size = tensor_data_offset(path)
    flip_bytes(path, offset + size // 2)
    with torch.serialization.safe_globals([argparse.Namespace]):
        # torch does not check its zip's CRC-32s: the damage loads silently
        torch.load(path, weights_only=True)
    assert zipfile.ZipFile(path).testzip() is not None  # (the zip's own CRC-32 does see it)
    with pytest.raises(RegditError) as error:
        load_checkpoint(path)
    assert str(error.value) == (
        f"checkpoint {path} is corrupt: its tensors do not match the checksum recorded when "
        "it was saved; use an earlier checkpoint or copy it again")


def test_bytes_changed_inside_an_export_are_caught(tmp_path):
    cli_main(["export", str(FIXTURES / "official_tiny_a_ckpt.pt"), "--output", str(tmp_path),
              "--num-heads", "4"])
    path = tmp_path / "model.safetensors"
    assert load_checkpoint(path)["ema"]  # intact: the checksum matches
    # then the JSON header, then the tensors' bytes
    header_length = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert "crc32:" in path.read_bytes()[8:8 + header_length].decode()  # recorded in the metadata
    flip_bytes(path, 8 + header_length + (path.stat().st_size - 8 - header_length) // 2)
    with pytest.raises(RegditError) as error:
        load_checkpoint(path)
    assert str(error.value) == (
        f"export {path} is corrupt: its tensors do not match the checksum recorded when it "
        "was exported; copy it again or export it again")


def test_official_checkpoint_has_no_checksum_and_loads_as_before(official_tiny):
    checkpoint = load_checkpoint(FIXTURES / "official_tiny_a_ckpt.pt")
    assert "checksum" not in checkpoint and checkpoint.keys() == official_tiny[0].keys()
    assert tensor_checksum(checkpoint) == tensor_checksum(official_tiny[0])


def _export_beside(tmp_path, config_text):
    """A valid model.safetensors with the bytes `config_text` as its config.json (None: no
    config.json)."""
    cli_main(["export", str(FIXTURES / "official_tiny_a_ckpt.pt"),
              "--output", str(tmp_path / "export"), "--num-heads", "4"])
    if config_text is None:
        (tmp_path / "export" / "config.json").unlink()
    else:
        (tmp_path / "export" / "config.json").write_bytes(config_text)
    return tmp_path / "export" / "model.safetensors"


# name -> (make it in tmp_path, returning its path; what the error says)
BAD_FILES = {
    "empty": (lambda d: (d / "empty.pt", (d / "empty.pt").write_bytes(b""))[0],
              r"is empty \(0 bytes\): copy it"),
    "random bytes": (lambda d: (d / "noise.pt",
                                (d / "noise.pt").write_bytes(random.Random(0).randbytes(4096)))[0],
                     r"is unreadable \(UnpicklingError: Unsupported operand \d+\): "
                     r"pass a training checkpoint"),
    "random zip": (lambda d: (d / "zip.pt",
                              (d / "zip.pt").write_bytes(b"PK\x03\x04" + bytes(100)))[0],
                   r"is unreadable \(RuntimeError: PytorchStreamReader failed reading zip archive"),
    "folder": (lambda d: (d / "folder.pt", (d / "folder.pt").mkdir())[0],
               r"is a folder: pass a training checkpoint"),
    "list": (lambda d: (d / "list.pt", torch.save([1, 2], d / "list.pt"))[0],
             r"holds a list, not a checkpoint"),
    "tensor": (lambda d: (d / "t.pt", torch.save(torch.ones(2), d / "t.pt"))[0],
               r"holds a Tensor, not a checkpoint"),
    "no weights": (lambda d: (d / "w.pt", torch.save({"step": 3}, d / "w.pt"))[0],
                   r"has no model weights \(keys: step\): pass"),
    "safetensors garbage": (lambda d: (d / "model.safetensors",
                                       (d / "config.json").write_text('{"model": {}}'),
                                       (d / "model.safetensors").write_bytes(bytes(64)))[0],
                            r"is unreadable \("),
    "no config.json": (lambda d: _export_beside(d, None),
                       r"has no config.json beside it: put the config.json"),
    "config not JSON": (lambda d: _export_beside(d, b"{model: "),
                        r"config.json, the settings of .*model.safetensors, "
                        r"is not JSON \(JSONDecodeError: .*\): copy it again or export again"),
    "config not UTF-8": (lambda d: _export_beside(d, b"\xff"), r"is not JSON \(UnicodeDecodeError"),
    "config without model": (lambda d: _export_beside(d, b'{"latents": {}}'),
                             r'has no "model" settings: copy'),
    "config a list": (lambda d: _export_beside(d, b"[1]"), r'has no "model" settings'),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_files_give_one_line_naming_the_file(tmp_path, name):
    make, message = BAD_FILES[name]
    path = make(tmp_path)
    # what the user sees: the command line's message, no traceback
    with pytest.raises(SystemExit) as error:
        cli_main(["export", str(path), "--output", str(tmp_path / "out")])
    assert isinstance(error.value.code, str) and "\n" not in error.value.code, error.value.code
    assert error.value.code.startswith("regdit export: error: ") and str(path) in error.value.code
    assert re.search(message, error.value.code), error.value.code


def test_an_exception_without_a_message_still_gives_one_line(tmp_path, monkeypatch):
    path = tmp_path / "0000001.pt"
    save_checkpoint({"ema": {}}, path)

    def fail(*args, **kwargs):
        raise RuntimeError()
    monkeypatch.setattr(torch, "load", fail)
    with pytest.raises(RegditError, match=rf"^checkpoint {re.escape(str(path))} is unreadable "
                                          r"\(RuntimeError\): "):
        load_checkpoint(path)

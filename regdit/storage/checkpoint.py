"""Checkpoints: the official format `{"model", "ema", "opt", "args", "steps"}` (args an
argparse.Namespace), read without executing pickled code; a checksum of the tensors, recorded on
save and export and verified on load; atomic writes; strict loading with errors that name the wrong
setting; and the `regdit export` command (EMA weights to safetensors + config JSON, optionally
pushed to the Hugging Face Hub with a model card)."""
import argparse
import hashlib
import json
import os
import zlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from regdit import RegditError
from regdit.core.models import SiT, SiTConfig, model_arguments
from regdit.files import atomic_write, check_regular_file
from regdit.storage.data import read_classes
from regdit.storage.hub import PREFIX, is_hub_url, parse, resolve_path
from regdit.storage.official import (
    PATCH_WEIGHTS,
    convert_legacy_state_dict,
    inferred_config,
    saved_args,
)
from regdit.storage.vae import LatentNorm


class _Crc32:
    """zlib.crc32 with hashlib's `update`/`hexdigest`."""

    def __init__(self):
        self.value = 0

    def update(self, data):
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self):
        return f"{self.value:08x}"


CHECKSUMS = {"crc32": _Crc32, "blake2b": hashlib.blake2b, "sha256": hashlib.sha256}


def tensor_checksum(obj, kind="crc32"):
    """`"KIND:HEX"` over every tensor in `obj` (nested dicts in sorted key order, lists and tuples
    in order; other values are skipped): each tensor's name path, dtype, shape and bytes, so a
    changed, swapped or reshaped tensor changes it. `torch.load` does not check the CRC-32s in a .pt
    file's zip: bytes changed on disk load silently without this. CRC-32 is the fastest of CHECKSUMS
    (benchmarks/bench_checksum.py) and catches disk and copy errors; it is no defence against
    deliberate tampering."""
    hasher = CHECKSUMS[kind]()

    def walk(value, name):
        if isinstance(value, torch.Tensor):
            # a 0-dim tensor cannot be viewed as bytes
            data = value.detach().cpu().contiguous().reshape(-1)
            hasher.update(f"{name} {value.dtype} {tuple(value.shape)}\n".encode())
            hasher.update(data.view(torch.uint8).numpy())  # bytes: bfloat16 has no numpy dtype
        elif isinstance(value, dict):
            for key in sorted(value, key=repr):
                walk(value[key], f"{name}/{key!r}")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, f"{name}/{i}")
    walk(obj, "")
    return f"{kind}:{hasher.hexdigest()}"


def _verify(tensors, recorded, what, fix):
    """One line naming `what` ("checkpoint X.pt") when `tensors` do not match the `recorded`
    checksum."""
    kind = str(recorded).partition(":")[0]
    if kind not in CHECKSUMS:
        raise RegditError(f"{what} records a checksum of unknown kind {kind!r}: load it with the "
                          "regdit version that wrote it")
    if tensor_checksum(tensors, kind) != recorded:
        raise RegditError(f"{what} is corrupt: its tensors do not match the checksum recorded when "
                          f"it was {fix}")


def error_reason(error):
    """`Type: first sentence` of an exception on one line (possibly just `Type`: some messages are
    empty)."""
    # not torch's advice to pass weights_only=False
    text = str(error).rpartition("WeightsUnpickler error:")[2]
    first_line = ([line.strip() for line in text.splitlines() if line.strip()] or [""])[0]
    reason = first_line.split(". ")[0][:120]
    return f"{type(error).__name__}: {reason}" if reason else type(error).__name__


def _unreadable(path, error):
    return RegditError(f"checkpoint {path} is unreadable ({error_reason(error)}): pass a training "
                       "checkpoint (.pt) or an export (.safetensors); if it is one, it is "
                       "truncated or corrupt: copy it again or use an earlier checkpoint")


def local_checkpoint(path):
    """The local path of a checkpoint; an `hf://` one is downloaded first (an export with its
    config.json)."""
    beside = ("config.json",) if str(path).endswith(".safetensors") else ()
    return resolve_path(path, "checkpoint", beside=beside)


def load_checkpoint(path):
    """Read a checkpoint with `weights_only=True`: a `.safetensors` export (its `config.json` beside
    it becomes `model_config`), or a torch file (official or regdit training checkpoint, or a bare
    state dict); local or `hf://`. The checksum that regdit checkpoints and exports record is
    verified (official files have none). The class names, when recorded, are under "classes". Every
    failure is a one-line RegditError naming the file."""
    path = local_checkpoint(path)
    if path.is_dir():
        found = sorted(path.glob("model.safetensors")) or sorted(path.glob("checkpoints/*.pt"))[-1:]
        raise RegditError(f"checkpoint {path} is a folder: pass " + (f"{found[0]}" if found else
                          "a training checkpoint (EXP/checkpoints/NNNNNNN.pt) or an export "
                          "(DIR/model.safetensors)"))
    check_regular_file(path, "checkpoint")
    if not path.is_file():
        raise RegditError(f"checkpoint {path} does not exist: pass the path of a .pt or "
                          ".safetensors file")
    if path.stat().st_size == 0:
        raise RegditError(f"checkpoint {path} is empty (0 bytes): copy it again or use an earlier "
                          "checkpoint")
    if path.suffix == ".safetensors":
        return _load_export(path)
    # official checkpoints pickle their argparse args; allowed per call (libraries may reset the
    # global list)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        # truncated zip, bad pickle, foreign format: all unreadable for the user
        raise _unreadable(path, error) from None
    if not isinstance(checkpoint, dict):
        raise RegditError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a "
                          "checkpoint (a dict of weights): pass a training checkpoint (.pt) or an "
                          "export (.safetensors)")
    if "checksum" in checkpoint:
        recorded = checkpoint.pop("checksum")
        _verify(checkpoint, recorded, f"checkpoint {path}",
                "saved; use an earlier checkpoint or copy it again")
    # a bare state dict, like some released weights
    if "ema" not in checkpoint and "model" not in checkpoint:
        if not checkpoint or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            raise RegditError(f"checkpoint {path} has no model weights (keys: "
                              f"{', '.join(map(str, checkpoint))}): pass a training checkpoint "
                              "(.pt) or an export (.safetensors)")
        checkpoint = {"ema": checkpoint}
    read_classes(checkpoint, f"checkpoint {path}", "copy it again or use an earlier checkpoint")
    return checkpoint


def _load_export(path):
    """An export: EMA weights in `path`, its settings in the config.json beside it."""
    config_path = path.with_name("config.json")
    check_regular_file(config_path)
    if not config_path.is_file():
        raise RegditError(f"export {path} has no config.json beside it: put the config.json that "
                          "`regdit export` wrote in the same folder, or export again")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as error:  # bad JSON or bad UTF-8
        raise RegditError(f"{config_path}, the settings of {path}, is not JSON "
                          f"({error_reason(error)}): copy it again or export again") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise RegditError(f'{config_path}, the settings of {path}, has no "model" settings: '
                          "copy it again or export again")
    # checked where it enters, naming the file
    SiTConfig.from_dict(config["model"], str(config_path))
    try:
        with safe_open(path, framework="pt") as f:
            metadata, ema = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except Exception as error:  # bad header, truncated file
        raise _unreadable(path, error) from None
    if "checksum" in metadata:
        _verify(ema, metadata["checksum"], f"export {path}",
                "exported; copy it again or export it again")
    return {"ema": ema, "model_config": config["model"], "latents": config.get("latents") or {},
            "args": argparse.Namespace(path_type=config.get("path_type")),
            "classes": read_classes(config, config_path, "copy it again or export again")}


def save_checkpoint(obj, path):
    """torch.save of the dict `obj` through `atomic_write` (the previous checkpoint survives a crash
    or a full disk), with the `tensor_checksum` of its tensors under "checksum", which
    `load_checkpoint` verifies and removes."""
    obj = {k: v for k, v in obj.items() if k != "checksum"}
    obj["checksum"] = tensor_checksum(obj)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        writer = _KeptWriteError(f)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is None:
                raise
            raise writer.error from None


class _KeptWriteError:
    """A file for torch.save that keeps the OSError of a failed write: torch's writer turns it (a
    full disk) into a RuntimeError that names neither the file nor the cause."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self):
        self.file.flush()




def _size_setting(state_dict, expected):
    """Which of train's size flags the weights `state_dict` have otherwise than the model's
    `expected` parameters: --depth (the number of blocks), --hidden-size (the width), --num-heads
    (the per-head q/k norms), the data (the latent channels), else --model (the patch size)."""
    def blocks(weights):
        return {k.split(".")[1] for k in weights if k.startswith("blocks.")}

    def differs(key, dims=slice(None)):
        return (key in state_dict
                and tuple(state_dict[key].shape)[dims] != tuple(expected[key].shape)[dims])

    if blocks(state_dict) != blocks(expected):
        return "--depth"
    if differs(PATCH_WEIGHTS, slice(0, 1)):
        return "--hidden-size"
    if any(differs(k) for k in expected if ".q_norm." in k):
        return "--num-heads"
    if differs(PATCH_WEIGHTS, slice(1, 2)):
        return "--data-dir (its latent channels: another VAE)"
    return "--model"


def _setting_hint(keys, state_dict, expected, size_flags=True):
    """The command-line setting most likely responsible for the mismatched parameter names `keys` of
    `state_dict` against the model's `expected` ones. `size_flags`: the command has --depth,
    --hidden-size and --num-heads (train), else the size is --model's (sample)."""
    if any((".q_norm" in k or ".k_norm" in k) and not (k in state_dict and k in expected)
           for k in keys):
        return "--qk-norm"
    if any(k.startswith("decoder_blocks.") for k in keys):
        return "--legacy (early REPA layout)"
    # depth, width or patch size
    if any(k.startswith(("x_embedder", "t_embedder", "blocks.")) for k in keys):
        return _size_setting(state_dict, expected) if size_flags else "--model"
    if any(k.startswith(("cls_projectors2", "wg_norm", "final_layer.linear_cls")) for k in keys):
        return "--cls-dim / --z-dims (REG class token) or REPA vs REG weights"
    if any(k.startswith("projectors.") for k in keys):
        return "--z-dims / --enc-type (one projector per encoder)"
    if any(k.startswith("pos_embed") for k in keys):
        return "--resolution or the patch size in --model"
    if any(k.startswith("y_embedder") for k in keys):
        return "--num-classes"
    return "--model"


def check_weights(state_dict, source):
    """One line naming `source` unless `state_dict` is a dict of tensors by name."""
    if not (isinstance(state_dict, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in state_dict.items())):
        raise RegditError(f"{source} holds no model weights (a dict of tensors by name): pass a "
                          "training checkpoint (.pt) or an export (.safetensors)")


def check_state_dict(expected, state_dict, source, size_flags=True):
    """A one-line error listing what of `state_dict` does not fit the parameters `expected` (a
    model's state_dict, also of a meta-device model: only names and shapes count) and the setting to
    fix (`_setting_hint`)."""
    check_weights(state_dict, source)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [k for k in expected
                  if k in state_dict and state_dict[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        groups = (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
        parts = [f"{label} {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                 for label, keys in groups if keys]
        if mismatched:
            k = mismatched[0]
            parts.append(f"({k}: checkpoint {tuple(state_dict[k].shape)}, model "
                         f"{tuple(expected[k].shape)})")
        hint = _setting_hint(missing + unexpected + mismatched, state_dict, expected, size_flags)
        raise RegditError(f"{source} does not match the model: {'; '.join(parts)}; check {hint}")


def load_state_dict_checked(model, state_dict, source, size_flags=True):
    """`model.load_state_dict(state_dict, strict=True)` with a one-line error listing what does not
    fit (`check_state_dict`; `size_flags` as there)."""
    check_state_dict(model.state_dict(), state_dict, source, size_flags)
    model.load_state_dict(state_dict, strict=True)


def model_config_from_checkpoint(checkpoint, state_dict=None, model_name=None, source="checkpoint",
                                 **overrides):
    """The SiTConfig of a checkpoint: regdit files store it; for official files it is read off the
    weights' shapes (`state_dict`, default its EMA weights) and the saved args. `model_name` (its
    size and patch, e.g. "SiT-XL/2") and `overrides` (SiTConfig fields, e.g. encoder_depth from the
    command line) win. Stored settings are checked as they are (types, ranges), then with the
    overrides."""
    if "model_config" in checkpoint:
        values = SiTConfig.from_dict(checkpoint["model_config"], source).to_dict()
    else:
        weights = state_dict or checkpoint.get("ema", checkpoint.get("model"))
        check_weights(weights, source)
        values = inferred_config(weights, saved_args(checkpoint, source), source)
    if model_name is not None:
        values.update(model_arguments(model_name))
    values.update(overrides)
    if values.get("num_heads") is None:
        raise RegditError(f"cannot tell the number of attention heads of {source}, a custom-size "
                          "checkpoint: pass --model with a standard size")
    return SiTConfig.from_dict(values, source)


class _ShapesOnly(torch.overrides.TorchFunctionMode):
    """Modules made in this mode skip the initialisers of torch.nn.init: a meta tensor has nothing
    to fill, and meta `normal_` alone imports torch._dynamo (seconds and 160 MB)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def _parameter_shapes(config, source, num_tensors):
    """The parameter names and shapes of `SiT(config)`, built on the meta device: no memory,
    whatever sizes a config read from a file claims. Every block and projector has weights, so more
    of them than `num_tensors` (the checkpoint's) cannot fit: refused before spending the time to
    build them."""
    if config.depth + len(config.z_dims) > num_tensors:
        raise RegditError(f"{source} does not match the model: {config.depth} blocks and "
                          f"{len(config.z_dims)} projectors cannot fit in its {num_tensors} "
                          "tensors; check --model")
    try:
        with torch.device("meta"), _ShapesOnly():
            return SiT(config).state_dict()
    except (RuntimeError, TypeError) as error:
        # how torch says a size or an element count overflows int64
        if "overflow" not in str(error).lower():
            raise
        raise RegditError(f"{source}: its model settings ask for tensors of more than 2**63 "
                          "elements; check --model") from None


def build_model_from_checkpoint(checkpoint, source="checkpoint", weights="ema", model_name=None,
                                legacy=False, fused_attn=True, **overrides):
    """`SiT(config)` with the checkpoint's `weights` ("ema" or "model") loaded strictly, the config
    from `model_config_from_checkpoint`; `source` names the checkpoint in errors. The parameter
    names and shapes are compared with the weights on a meta-device model first, so a config that
    does not match costs no memory and one that does costs what the weights do. `legacy` renumbers
    official `decoder_blocks` weights first (`--legacy`)."""
    if weights not in checkpoint:
        raise RegditError(f"{source} has no {weights} weights (keys: "
                          f"{', '.join(map(str, checkpoint))})")
    state_dict = checkpoint[weights]
    check_weights(state_dict, source)
    if legacy:
        args = saved_args(checkpoint, source)
        encoder_depth = overrides.get("encoder_depth", args.get("encoder_depth", 8))
        state_dict = convert_legacy_state_dict(state_dict, encoder_depth)
    config = model_config_from_checkpoint(checkpoint, state_dict, model_name, source, **overrides)
    check_state_dict(_parameter_shapes(config, source, len(state_dict)), state_dict, source,
                     size_flags=False)
    model = SiT(config, fused_attn=fused_attn)
    model.load_state_dict(state_dict, strict=True)
    return model


def write_export(output_dir, weights, model_config, latents=None, path_type=None, classes=None):
    """The export format, for `regdit export` and `save_pretrained`: `model.safetensors` (`weights`,
    their checksum in its metadata, which `load_checkpoint` verifies) + `config.json` {"model": the
    SiTConfig dict, "latents", "path_type", "classes" (the class names, or null)}. Returns the path
    of the weights."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    settings = dict(model=model_config.to_dict(), latents=latents, path_type=path_type,
                    classes=classes)
    with atomic_write(output_dir / "config.json", "w") as f:
        f.write(json.dumps(settings, indent=2) + "\n")
    with atomic_write(output_dir / "model.safetensors") as f:
        f.write(save(weights, metadata={"format": "pt", "checksum": tensor_checksum(weights)}))
    return output_dir / "model.safetensors"


def from_pretrained(source, weights="ema", fused_attn=True):
    """A SiT in eval mode from an export (its folder or its model.safetensors, local or `hf://`), a
    Hub repository id `OWNER/NAME[@REVISION]` holding an export at its root, or a training
    checkpoint (.pt, its `weights`: ema or model), read by `load_checkpoint` (checksum verified).
    What decodes its samples comes with it: `model.latents` (the recorded VAE, scale and
    resolution; {} for official checkpoints) and `model.latent_norm` (the LatentNorm for
    `decode_latents`; None: the VAE's own scale and shift)."""
    source = str(source)
    if not is_hub_url(source) and not os.path.exists(source) and source.count("/") == 1:
        source = PREFIX + source  # a repository id, as huggingface_hub's from_pretrained takes
    if is_hub_url(source) and not parse(source).is_file:
        location = parse(source)
        source = location.at(f"{location.path}/model.safetensors")
    elif os.path.isdir(source):
        source = os.path.join(source, "model.safetensors")
    checkpoint = load_checkpoint(source)
    model = build_model_from_checkpoint(checkpoint, source, weights, fused_attn=fused_attn).eval()
    model.latents = checkpoint.get("latents") or {}
    norm = model.latents.get("norm")
    model.latent_norm = LatentNorm.from_dict(norm, source) if norm else None
    return model


def save_pretrained(model, save_directory, latents=None, path_type=None, classes=None):
    """Write `model`'s weights in the export format (what `regdit export` writes and
    `from_pretrained` reads) into `save_directory`; `latents` ({"vae", "scale", "resolution"}) and
    `path_type` tell `regdit sample` how to sample and decode, `classes` names the classes (for
    `regdit app`). Returns the path of the weights."""
    return write_export(save_directory, model.state_dict(), model.config, latents, path_type,
                        classes)

"""Checkpoints: the official format `{"model", "ema", "opt", "args", "steps"}` (args an argparse.Namespace), read
without executing pickled code; a checksum of the tensors, recorded on save and export and verified on load; atomic
writes; strict loading with errors that name the wrong setting; and the `regdit export` command (EMA weights to
safetensors + config JSON, optionally pushed to the Hugging Face Hub with a model card)."""
import argparse
import hashlib
import json
import os
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import torch
from huggingface_hub import constants
from safetensors import safe_open
from safetensors.torch import save

from regdit import RegditError
from regdit.config import Settings, flag
from regdit.files import atomic_write, check_output, file_kind, read_head
from regdit.hub import check_repo_id, model_card, push_folder, resolve_path
from regdit.models import MODEL_SIZES, SiT, SiTConfig, model_arguments


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
    """`"KIND:HEX"` over every tensor in `obj` (nested dicts in sorted key order, lists and tuples in order; other
    values are skipped): each tensor's name path, dtype, shape and bytes, so a changed, swapped or reshaped tensor
    changes it. `torch.load` does not check the CRC-32s in a .pt file's zip: bytes changed on disk load silently
    without this. CRC-32 is the fastest of CHECKSUMS (benchmarks/bench_checksum.py) and catches disk and copy
    errors; it is no defence against deliberate tampering."""
    hasher = CHECKSUMS[kind]()

    def walk(value, name):
        if isinstance(value, torch.Tensor):
            data = value.detach().cpu().contiguous().reshape(-1)  # a 0-dim tensor cannot be viewed as bytes
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
    """One line naming `what` ("checkpoint X.pt") when `tensors` do not match the `recorded` checksum."""
    kind = str(recorded).partition(":")[0]
    if kind not in CHECKSUMS:
        raise RegditError(f"{what} records a checksum of unknown kind {kind!r}: load it with the regdit version that "
                          "wrote it")
    if tensor_checksum(tensors, kind) != recorded:
        raise RegditError(f"{what} is corrupt: its tensors do not match the checksum recorded when it was {fix}")


def _reason(error):
    """`Type: first sentence` of an exception on one line (possibly just `Type`: some messages are empty)."""
    text = str(error).rpartition("WeightsUnpickler error:")[2]  # not torch's advice to pass weights_only=False
    reason = ([line.strip() for line in text.splitlines() if line.strip()] or [""])[0].split(". ")[0][:120]
    return f"{type(error).__name__}: {reason}" if reason else type(error).__name__


def _unreadable(path, error):
    return RegditError(f"checkpoint {path} is unreadable ({_reason(error)}): pass a training checkpoint (.pt) or an "
                       "export (.safetensors); if it is one, it is truncated or corrupt: copy it again or use an "
                       "earlier checkpoint")


def local_checkpoint(path):
    """The local path of a checkpoint; an `hf://` one is downloaded first (an export with its config.json)."""
    return resolve_path(path, "checkpoint", beside=("config.json",) if str(path).endswith(".safetensors") else ())


def load_checkpoint(path):
    """Read a checkpoint with `weights_only=True`: a `.safetensors` export (its `config.json` beside it becomes
    `model_config`), or a torch file (official or regdit training checkpoint, or a bare state dict); local or
    `hf://`. The checksum that regdit checkpoints and exports record is verified (official files have none). Every
    failure is a one-line RegditError naming the file."""
    path = local_checkpoint(path)
    if path.is_dir():
        found = sorted(path.glob("model.safetensors")) or sorted(path.glob("checkpoints/*.pt"))[-1:]
        raise RegditError(f"checkpoint {path} is a folder: pass " + (f"{found[0]}" if found else
                          "a training checkpoint (EXP/checkpoints/NNNNNNN.pt) or an export (DIR/model.safetensors)"))
    if not path.is_file():
        raise RegditError(f"checkpoint {path} does not exist: pass the path of a .pt or .safetensors file")
    if path.stat().st_size == 0:
        raise RegditError(f"checkpoint {path} is empty (0 bytes): copy it again or use an earlier checkpoint")
    if path.suffix == ".safetensors":
        return _load_export(path)
    try:  # official checkpoints pickle their argparse args; allowed per call (libraries may reset the global list)
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, bad pickle, foreign format: all unreadable for the user
        raise _unreadable(path, error) from None
    if not isinstance(checkpoint, dict):
        raise RegditError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a checkpoint (a dict of "
                          "weights): pass a training checkpoint (.pt) or an export (.safetensors)")
    if "checksum" in checkpoint:
        recorded = checkpoint.pop("checksum")
        _verify(checkpoint, recorded, f"checkpoint {path}", "saved; use an earlier checkpoint or copy it again")
    if "ema" not in checkpoint and "model" not in checkpoint:  # a bare state dict, like some released weights
        if not checkpoint or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            raise RegditError(f"checkpoint {path} has no model weights (keys: {', '.join(map(str, checkpoint))}): "
                              "pass a training checkpoint (.pt) or an export (.safetensors)")
        checkpoint = {"ema": checkpoint}
    return checkpoint


def _load_export(path):
    """An export: EMA weights in `path`, its settings in the config.json beside it."""
    config_path = path.with_name("config.json")
    if not config_path.is_file():
        raise RegditError(f"export {path} has no config.json beside it: put the config.json that `regdit export` "
                          "wrote in the same folder, or export again")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as error:  # bad JSON or bad UTF-8
        raise RegditError(f"{config_path}, the settings of {path}, is not JSON ({_reason(error)}): copy it again or "
                          "export again") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise RegditError(f'{config_path}, the settings of {path}, has no "model" settings: copy it again or export '
                          "again")
    SiTConfig.from_dict(config["model"], str(config_path))  # checked where it enters, naming the file
    try:
        with safe_open(path, framework="pt") as f:
            metadata, ema = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except Exception as error:  # bad header, truncated file
        raise _unreadable(path, error) from None
    if "checksum" in metadata:
        _verify(ema, metadata["checksum"], f"export {path}", "exported; copy it again or export it again")
    return {"ema": ema, "model_config": config["model"], "latents": config.get("latents") or {},
            "args": argparse.Namespace(path_type=config.get("path_type"))}


def save_checkpoint(obj, path):
    """torch.save of the dict `obj` through `atomic_write` (the previous checkpoint survives a crash or a full disk),
    with the `tensor_checksum` of its tensors under "checksum", which `load_checkpoint` verifies and removes."""
    obj = {k: v for k, v in obj.items() if k != "checksum"}
    obj["checksum"] = tensor_checksum(obj)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        torch.save(obj, f)


PATCH_WEIGHTS = "x_embedder.proj.weight"  # (hidden_size, in_channels, patch_size, patch_size)


def _size_setting(state_dict, expected):
    """Which of train's size flags the weights `state_dict` have otherwise than the model's `expected` parameters:
    --depth (the number of blocks), --hidden-size (the width), --num-heads (the per-head q/k norms), the data (the
    latent channels), else --model (the patch size)."""
    def blocks(weights):
        return {k.split(".")[1] for k in weights if k.startswith("blocks.")}

    def differs(key, dims=slice(None)):
        return key in state_dict and tuple(state_dict[key].shape)[dims] != tuple(expected[key].shape)[dims]

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
    """The command-line setting most likely responsible for the mismatched parameter names `keys` of `state_dict`
    against the model's `expected` ones. `size_flags`: the command has --depth, --hidden-size and --num-heads
    (train), else the size is --model's (sample)."""
    if any((".q_norm" in k or ".k_norm" in k) and not (k in state_dict and k in expected) for k in keys):
        return "--qk-norm"
    if any(k.startswith("decoder_blocks.") for k in keys):
        return "--legacy (early REPA layout)"
    if any(k.startswith(("x_embedder", "t_embedder", "blocks.")) for k in keys):  # depth, width or patch size
        return _size_setting(state_dict, expected) if size_flags else "--model"
    if any(k.startswith(("cls_projectors2", "wg_norm", "final_layer.linear_cls")) for k in keys):
        return "--cls / --projector-embed-dims (REG class token) or REPA vs REG weights"
    if any(k.startswith("projectors.") for k in keys):
        return "--projector-embed-dims / --enc-type (one projector per encoder)"
    if any(k.startswith("pos_embed") for k in keys):
        return "--resolution or the patch size in --model"
    if any(k.startswith("y_embedder") for k in keys):
        return "--num-classes"
    return "--model"


def _check_weights(state_dict, source):
    """One line naming `source` unless `state_dict` is a dict of tensors by name."""
    if not (isinstance(state_dict, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in state_dict.items())):
        raise RegditError(f"{source} holds no model weights (a dict of tensors by name): pass a training checkpoint "
                          "(.pt) or an export (.safetensors)")


def check_state_dict(expected, state_dict, source, size_flags=True):
    """A one-line error listing what of `state_dict` does not fit the parameters `expected` (a model's state_dict,
    also of a meta-device model: only names and shapes count) and the setting to fix (`_setting_hint`)."""
    _check_weights(state_dict, source)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [k for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        parts = [f"{label} {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
                 if keys]
        if mismatched:
            k = mismatched[0]
            parts.append(f"({k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)})")
        hint = _setting_hint(missing + unexpected + mismatched, state_dict, expected, size_flags)
        raise RegditError(f"{source} does not match the model: {'; '.join(parts)}; check {hint}")


def load_state_dict_checked(model, state_dict, source, size_flags=True):
    """`model.load_state_dict(state_dict, strict=True)` with a one-line error listing what does not fit
    (`check_state_dict`; `size_flags` as there)."""
    check_state_dict(model.state_dict(), state_dict, source, size_flags)
    model.load_state_dict(state_dict, strict=True)


CLASS_TABLE = "y_embedder.embedding_table.weight"


def load_init_weights(model, path, weights="ema", log=print):
    """`train --init-from`: load a checkpoint's `weights` ("ema" or "model") into a new run's `model`. Every tensor
    must fit as in `load_state_dict_checked`, except the class embedding when the class count differs: the rows of
    the classes both models have (0 .. min - 1) are copied, the source's null-class row (the guidance class) moves
    to the model's null index `num_classes`, and the rows of classes the source lacks keep their fresh
    initialisation; `log` says so in one line."""
    checkpoint = load_checkpoint(path)
    if weights not in checkpoint:
        raise RegditError(f"--init-from {path} has no {weights} weights (an export holds EMA weights only): pass "
                          "--init-weights ema")
    _check_weights(checkpoint[weights], f"--init-from {path}")
    state = dict(checkpoint[weights])
    source, table = state.get(CLASS_TABLE), model.state_dict()[CLASS_TABLE]
    if source is not None and source.shape != table.shape and source.shape[1:] == table.shape[1:]:
        # official checkpoints store no config: they were trained with label dropout, so their last row is null
        stored = checkpoint.get("model_config")
        source_classes = SiTConfig.from_dict(stored, f"--init-from {path}").num_classes if stored else len(source) - 1
        common, resized = min(source_classes, model.num_classes), table.clone()
        resized[:common] = source[:common]
        null_moved = len(source) > source_classes and len(table) > model.num_classes
        if null_moved:
            resized[model.num_classes] = source[source_classes]
        state[CLASS_TABLE] = resized
        log(f"--init-from {path}: class embedding resized from {source_classes} to {model.num_classes} classes "
            f"(rows 0-{common - 1} copied" + (f", null class moved to row {model.num_classes}" if null_moved else "")
            + (f", {model.num_classes - common} new rows freshly initialised" if model.num_classes > common else "")
            + ")")
    load_state_dict_checked(model, state, f"--init-from {path}")


def convert_legacy_state_dict(state_dict, encoder_depth):
    """`--legacy` (REPA's load_legacy_checkpoints): early checkpoints kept the blocks after the projection layer in
    `decoder_blocks.i`; they are `blocks.{i + encoder_depth}` here."""
    converted = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "decoder_blocks":
            parts[:2] = ["blocks", str(int(parts[1]) + encoder_depth)]
        converted[".".join(parts)] = value
    return converted


def _saved_args(checkpoint, source):
    """The training flags an official checkpoint saved (`args`, an argparse.Namespace) as a dict; {} without."""
    args = checkpoint.get("args")
    if args is None or isinstance(args, dict):
        return args or {}
    if not isinstance(args, argparse.Namespace):
        raise RegditError(f"{source}: its args are a {type(args).__name__}, not the settings of a training run: pass "
                          "a training checkpoint (.pt) or an export (.safetensors)")
    return vars(args)


def model_config_from_checkpoint(checkpoint, state_dict=None, model_name=None, source="checkpoint", **overrides):
    """The SiTConfig of a checkpoint: regdit files store it; for official files it is read off the weights' shapes
    (`state_dict`, default its EMA weights) and the saved args. `model_name` (its size and patch, e.g. "SiT-XL/2")
    and `overrides` (SiTConfig fields, e.g. encoder_depth from the command line) win. Stored settings are checked
    as they are (types, ranges), then with the overrides."""
    if "model_config" in checkpoint:
        values = SiTConfig.from_dict(checkpoint["model_config"], source).to_dict()
    else:
        values = _inferred_config(state_dict or checkpoint.get("ema", checkpoint.get("model")),
                                  _saved_args(checkpoint, source), source)
    if model_name is not None:
        values.update(model_arguments(model_name))
    values.update(overrides)
    if values.get("num_heads") is None:
        raise RegditError(f"cannot tell the number of attention heads of {source}, a custom-size checkpoint: "
                          "pass --model with a standard size")
    return SiTConfig.from_dict(values, source)


def _inferred_config(weights, args, source="checkpoint"):
    """The settings of official weights: sizes from the parameter shapes, encoder_depth from the saved args. A SiT
    parameter that is missing or of another rank is one line naming `source`."""
    _check_weights(weights, source)
    if any(k.startswith("decoder_blocks.") for k in weights):
        raise RegditError("these weights have the early REPA layout (decoder_blocks): pass --legacy")

    def shape(key, ndim):
        tensor = weights.get(key)
        if tensor is None or tensor.ndim != ndim:
            found = "missing" if tensor is None else f"{tensor.ndim}-D {list(tensor.shape)}"
            raise RegditError(f"{source} has no SiT weights to read the model from ({key}: {found}, not {ndim}-D): "
                              "pass a regdit or official SiT checkpoint")
        return tensor.shape

    hidden_size, in_channels, patch_size, _ = shape(PATCH_WEIGHTS, 4)
    blocks = [k.split(".")[1] for k in weights if k.startswith("blocks.")]
    depth = 1 + max((int(i) for i in blocks if i.isdecimal()), default=-1)
    size = next((s for s, (d, w, _) in MODEL_SIZES.items() if (d, w) == (depth, hidden_size)), None)
    z_dims, k = [], 0
    while f"projectors.{k}.4.weight" in weights:
        z_dims.append(shape(f"projectors.{k}.4.weight", 2)[0])
        k += 1
    use_cls_token = "cls_projectors2.weight" in weights
    num_tokens = shape("pos_embed", 3)[1] - int(use_cls_token)
    return dict(
        input_size=int(num_tokens ** 0.5) * patch_size, patch_size=patch_size, in_channels=in_channels,
        hidden_size=hidden_size, depth=depth, num_heads=MODEL_SIZES[size][2] if size else args.get("num_heads"),
        num_classes=shape("y_embedder.embedding_table.weight", 2)[0] - 1,
        z_dims=z_dims, projector_dim=shape("projectors.0.0.weight", 2)[0] if z_dims else 2048,
        encoder_depth=args.get("encoder_depth", 8), use_cls_token=use_cls_token,
        qk_norm="blocks.0.attn.q_norm.weight" in weights)


class _ShapesOnly(torch.overrides.TorchFunctionMode):
    """Modules made in this mode skip the initialisers of torch.nn.init: a meta tensor has nothing to fill, and meta
    `normal_` alone imports torch._dynamo (seconds and 160 MB)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def _parameter_shapes(config, source, num_tensors):
    """The parameter names and shapes of `SiT(config)`, built on the meta device: no memory, whatever sizes a
    config read from a file claims. Every block and projector has weights, so more of them than `num_tensors` (the
    checkpoint's) cannot fit: refused before spending the time to build them."""
    if config.depth + len(config.z_dims) > num_tensors:
        raise RegditError(f"{source} does not match the model: {config.depth} blocks and {len(config.z_dims)} "
                          f"projectors cannot fit in its {num_tensors} tensors; check --model")
    try:
        with torch.device("meta"), _ShapesOnly():
            return SiT(config).state_dict()
    except (RuntimeError, TypeError) as error:  # how torch says a size or an element count overflows int64
        if "overflow" not in str(error).lower():
            raise
        raise RegditError(f"{source}: its model settings ask for tensors of more than 2**63 elements; check "
                          "--model") from None


def build_model_from_checkpoint(checkpoint, source="checkpoint", weights="ema", model_name=None, legacy=False,
                                fused_attn=True, **overrides):
    """`SiT(config)` with the checkpoint's `weights` ("ema" or "model") loaded strictly, the config from
    `model_config_from_checkpoint`; `source` names the checkpoint in errors. The parameter names and shapes are
    compared with the weights on a meta-device model first, so a config that does not match costs no memory and
    one that does costs what the weights do. `legacy` renumbers official `decoder_blocks` weights first
    (`--legacy`)."""
    if weights not in checkpoint:
        raise RegditError(f"{source} has no {weights} weights (keys: {', '.join(map(str, checkpoint))})")
    state_dict = checkpoint[weights]
    _check_weights(state_dict, source)
    if legacy:
        args = _saved_args(checkpoint, source)
        state_dict = convert_legacy_state_dict(state_dict, overrides.get("encoder_depth",
                                                                          args.get("encoder_depth", 8)))
    config = model_config_from_checkpoint(checkpoint, state_dict, model_name, source, **overrides)
    check_state_dict(_parameter_shapes(config, source, len(state_dict)), state_dict, source, size_flags=False)
    model = SiT(config, fused_attn=fused_attn)
    model.load_state_dict(state_dict, strict=True)
    return model


@dataclass
class ExportConfig(Settings):
    ckpt: str | None = flag(None, "a regdit or official training checkpoint (.pt), local or hf://", positional=True,
                            required=True)
    output: str | None = flag(None, "folder for model.safetensors, config.json and the model card README.md: new, "
                                    "empty or an earlier export", required=True)
    num_heads: int | None = flag(None, "attention heads, only needed for custom model sizes (standard sizes know "
                                       "theirs)", at_least=1)
    push_to_hub: str | None = flag(None, "then upload the export's files to this Hub repository, created if missing "
                                         "(token: HF_TOKEN or `hf auth login`)", metavar="OWNER/NAME")
    private: bool = flag(False, "with --push-to-hub: create the repository private")
    metrics: str | None = flag(None, "a `regdit eval` metrics JSON to show on the model card", metavar="JSON")
    grid: str | None = flag(None, "sample grid image for the model card (default: the run's preview at the "
                                  "checkpoint's step, EXP/samples/STEP.png, if there is one)", metavar="PNG")
    license: str = flag("mit", "license of the model card, a Hub license id (mit, apache-2.0, cc-by-nc-4.0, other)")

    def check(self):
        if self.private and self.push_to_hub is None:
            raise RegditError("--private applies to the repository --push-to-hub creates: add --push-to-hub "
                              "OWNER/NAME or drop --private")
        if self.push_to_hub == "":
            raise RegditError("--push-to-hub '' names no repository: pass OWNER/NAME, or drop --push-to-hub to export "
                              "only")
        if self.push_to_hub is not None:
            check_repo_id(self.push_to_hub, "--push-to-hub")
            if constants.HF_HUB_OFFLINE:  # refused before anything is read or written
                raise RegditError(f"--push-to-hub {self.push_to_hub} needs the network but HF_HUB_OFFLINE=1 is set: "
                                  "unset it, or drop --push-to-hub to export only")


CARD_SETTINGS = ("enc_type", "encoder_depth", "proj_coeff", "cls", "batch_size", "learning_rate", "ema_decay",
                 "cfg_prob", "weighting", "init_from")  # training settings shown on the model card, when recorded
METHODS = {"reg": "REG (entangled class token + REPA alignment)", "repa": "REPA (alignment only)", "sit": "SiT"}


def write_export(output_dir, weights, model_config, latents=None, path_type=None):
    """The export format, for `regdit export` and `SiT.save_pretrained`: `model.safetensors` (`weights`, their
    checksum in its metadata, which `load_checkpoint` verifies) + `config.json` {"model": the SiTConfig dict,
    "latents", "path_type"}. Returns the path of the weights."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    settings = dict(model=model_config.to_dict(), latents=latents, path_type=path_type)
    with atomic_write(output_dir / "config.json", "w") as f:
        f.write(json.dumps(settings, indent=2) + "\n")
    with atomic_write(output_dir / "model.safetensors") as f:
        f.write(save(weights, metadata={"format": "pt", "checksum": tensor_checksum(weights)}))
    return output_dir / "model.safetensors"


def read_eval_metrics(path):
    """The five metrics and the settings of a `regdit eval` JSON, checked: a one-line error otherwise."""
    from regdit.evaluate import METRIC_NAMES  # the evaluator's imports only when a card shows metrics

    if Path(path).exists() and not Path(path).is_file():  # never opened: reading a FIFO would wait forever
        raise RegditError(f"--metrics {path} is {file_kind(os.stat(path).st_mode)}, not a file: pass the JSON "
                          "`regdit eval` wrote")
    try:
        results = json.loads(read_head(path, MAX_METRICS_BYTES))
    except (OSError, ValueError) as error:
        raise RegditError(f"--metrics {path} is unreadable ({_reason(error)}): pass the JSON `regdit eval` "
                          "wrote") from None
    if not isinstance(results, dict) or not all(isinstance(results.get(k), (int, float)) for k in METRIC_NAMES):
        raise RegditError(f"--metrics {path} is not a `regdit eval` metrics JSON (it needs {', '.join(METRIC_NAMES)})")
    return {name: results[key] for key, name in METRIC_NAMES.items()}, results.get("settings") or {}


MAX_METRICS_BYTES = 1 << 20  # a metrics JSON is about 700 bytes
MAX_GRID_BYTES, MAX_GRID_PIXELS = 64 << 20, 8192 * 8192  # far above any sample grid, below PIL's bomb warning


def check_grid(path):
    """One line unless `path` is an image that PIL decodes whole, of at most MAX_GRID_BYTES and MAX_GRID_PIXELS."""
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise RegditError(f"--grid {path} does not exist: pass a sample grid image") from None
    if not stat.S_ISREG(info.st_mode):  # never opened: reading a FIFO would wait forever
        raise RegditError(f"--grid {path} is {file_kind(info.st_mode)}, not an image file: pass a sample grid image")
    if info.st_size > MAX_GRID_BYTES:
        raise RegditError(f"--grid {path} has {info.st_size / 2**20:.0f} MiB, more than a sample grid's "
                          f"{MAX_GRID_BYTES >> 20} MiB: pass a smaller image")
    try:
        with PIL.Image.open(path) as image:
            if image.width * image.height > MAX_GRID_PIXELS:
                raise RegditError(f"--grid {path} is {image.width}x{image.height} px, more than a sample grid's "
                                  f"{MAX_GRID_PIXELS} pixels: pass a smaller image")
            image.load()
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:  # PIL's unreadable file
        raise RegditError(f"--grid {path} is not a readable image ({_reason(error)}): pass a sample grid image (PNG "
                          "or JPEG)") from None


def foreign_to_export(folder):
    """None for a folder that holds an earlier export alone (EXPORT_FILES and its samples.<ext> grid), else what
    else is in it."""
    others = sorted(p.name for p in folder.iterdir()
                    if p.name not in EXPORT_FILES and not (p.stem == "samples" and p.is_file()))
    if others:
        return (f"it holds {', '.join(others[:3])}{' ...' if len(others) > 3 else ''}, which an export does not "
                f"(an export folder holds {', '.join(EXPORT_FILES)} and samples.<ext> only)")
    return None


def foreign_to_weights(path):
    try:
        with safe_open(path, framework="pt") as f:
            recorded = "checksum" in (f.metadata() or {})
    except Exception:  # not safetensors at all: safetensors raises its own error types
        recorded = False
    return None if recorded else "it is not the weights of an export (safetensors with a checksum)"


def foreign_to_settings(path):
    try:
        settings = json.loads(read_head(path, MAX_METRICS_BYTES))
    except ValueError:
        settings = None
    return None if isinstance(settings, dict) and isinstance(settings.get("model"), dict) else \
        'it is not the settings of an export (JSON with "model")'


def foreign_to_card(path):
    return None if b"library_name: regdit" in read_head(path, 4096) else "it is not the model card of an export"


EXPORT_FILES = {"model.safetensors": foreign_to_weights, "config.json": foreign_to_settings,
                "README.md": foreign_to_card}  # with the sample grid samples.<ext>: what `regdit export` writes


def check_export_folder(folder, grid_name, inputs):
    """One line, before any work, unless `folder` is new, empty or an earlier export, and none of the files the
    export writes there (EXPORT_FILES, the grid `grid_name`) is another's file or one of the `inputs`."""
    check_output(folder, "--output", foreign_to_export, folder=True)
    for name, foreign in {**EXPORT_FILES, **({grid_name: None} if grid_name else {})}.items():
        check_output(folder / name, "--output", foreign, inputs)


def export(config: ExportConfig):
    """EMA weights as `model.safetensors` + `config.json` (the SiTConfig, latents, path type), the shareable form
    of a run, with a model card README.md (and the sample grid it shows); `--push-to-hub` uploads exactly these
    files. Writes into a new or empty folder, or over an earlier export. Returns the path of the weights."""
    grid = Path(config.grid) if config.grid else None
    output_dir = Path(config.output)
    check_export_folder(output_dir, grid and f"samples{grid.suffix}",
                        {"checkpoint": config.ckpt, "--grid": config.grid, "--metrics": config.metrics})
    if grid is not None:
        check_grid(grid)
    metrics = read_eval_metrics(config.metrics) if config.metrics else None
    ckpt = local_checkpoint(config.ckpt)
    checkpoint = load_checkpoint(ckpt)
    if "ema" not in checkpoint:
        raise RegditError(f"{config.ckpt} has no EMA weights (keys {', '.join(checkpoint)}): export a training "
                          "checkpoint")
    overrides = {"num_heads": config.num_heads} if config.num_heads else {}
    model_config = model_config_from_checkpoint(checkpoint, source=config.ckpt, **overrides)
    latents = checkpoint.get("latents")  # regdit runs' VAE and scale
    path_type = getattr(checkpoint.get("args"), "path_type", None)
    weights = write_export(output_dir, checkpoint["ema"], model_config, latents, path_type)
    print(f"wrote {weights}")
    written = [weights.name, "config.json", "README.md"]
    preview = ckpt.parent.parent / "samples" / f"{ckpt.stem}.png"  # a regdit run's grid at this checkpoint's step
    grid = grid or (preview if preview.is_file() else None)
    if grid is not None:
        written.append(f"samples{grid.suffix}")
        with atomic_write(output_dir / written[-1]) as f:
            f.write(grid.read_bytes())
    training = checkpoint.get("config") or vars(checkpoint.get("args") or argparse.Namespace())
    method = "reg" if model_config.use_cls_token else "repa" if model_config.z_dims else "sit"
    parameters = sum(v.numel() for v in checkpoint["ema"].values()) / 1e6
    rows = {"model": f"{model_config.label} ({parameters:.1f}M parameters)", "method": METHODS[method],
            "training steps": checkpoint.get("steps", "not recorded"), "classes": model_config.num_classes,
            "resolution": (latents or {}).get("resolution") or training.get("resolution", "not recorded"),
            "latents": (latents or {}).get("vae") or "not recorded (official checkpoints: sd-vae-ft-ema)",
            "path type": path_type or "linear",
            **{k: training[k] for k in CARD_SETTINGS if training.get(k) is not None}}
    ckpt_ref = f"hf://{config.push_to_hub}/model.safetensors" if config.push_to_hub else str(weights)
    card = model_card(config.push_to_hub or output_dir.name, rows, metrics, grid and f"samples{grid.suffix}",
                      ckpt_ref, config.push_to_hub or str(output_dir), config.license)
    with atomic_write(output_dir / "README.md", "w") as f:
        f.write(card)
    print(f"wrote {output_dir / 'README.md'} (model card)" + ("" if grid else "; no sample grid: pass --grid PNG"))
    if config.push_to_hub:
        url = push_folder(output_dir, written, config.push_to_hub, config.private,
                          f"{model_config.label} exported by regdit from {ckpt.name}")
        print(f"pushed {', '.join(written)} of {output_dir} to {url}")
    return weights

"""Checkpoints: the official format `{"model", "ema", "opt", "args", "steps"}` (args an argparse.Namespace), read
without executing pickled code; atomic writes; strict loading with errors that name the wrong setting; and the
`regdit export` command (EMA weights to safetensors + config JSON)."""
import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from regdit import RegditError, atomic_write
from regdit.config import flag
from regdit.models import MODEL_SIZES, SiT, SiTConfig, model_arguments


def load_checkpoint(path):
    """Read a checkpoint with `weights_only=True`: a `.safetensors` export (its `config.json` beside it becomes
    `model_config`), or a torch file (official or regdit training checkpoint, or a bare state dict)."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("model.safetensors")) or sorted(path.glob("checkpoints/*.pt"))[-1:]
        raise RegditError(f"checkpoint {path} is a folder: pass " + (f"{found[0]}" if found else
                          "a training checkpoint (EXP/checkpoints/NNNNNNN.pt) or an export (DIR/model.safetensors)"))
    if not path.is_file():
        raise RegditError(f"checkpoint {path} does not exist: pass the path of a .pt or .safetensors file")
    try:
        if path.suffix == ".safetensors":  # an export: settings in config.json beside it
            config = json.loads(path.with_name("config.json").read_text())
            return {"ema": load_file(path), "model_config": config["model"], "latents": config.get("latents") or {},
                    "args": argparse.Namespace(path_type=config.get("path_type"))}
        # official checkpoints pickle their argparse args; allowed per call (libraries may reset the global list)
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, bad pickle, foreign format: all unreadable for the user
        reason = (str(error).splitlines() or [""])[0][:120]  # some errors have an empty message
        raise RegditError(f"checkpoint {path} is unreadable ({type(error).__name__}: {reason}): "
                          "pass a training checkpoint (.pt) or an export (.safetensors); if it is one, it is truncated "
                          "or corrupt: copy it again or use an earlier checkpoint") from None
    if isinstance(checkpoint, dict) and "ema" not in checkpoint and "model" not in checkpoint:
        checkpoint = {"ema": checkpoint}  # a bare state dict, like some released weights
    return checkpoint


def save_checkpoint(obj, path):
    """torch.save through `atomic_write`: the previous checkpoint survives a crash or a full disk."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        torch.save(obj, f)


def _setting_hint(keys):
    """The command-line setting most likely responsible for mismatched parameter names."""
    if any(".q_norm" in k or ".k_norm" in k for k in keys):
        return "--qk-norm"
    if any(k.startswith("decoder_blocks.") for k in keys):
        return "--legacy (early REPA layout)"
    if any(k.startswith(("x_embedder", "t_embedder", "blocks.")) for k in keys):  # depth, width or patch size
        return "--model"
    if any(k.startswith(("cls_projectors2", "wg_norm", "final_layer.linear_cls")) for k in keys):
        return "--cls / --projector-embed-dims (REG class token) or REPA vs REG weights"
    if any(k.startswith("projectors.") for k in keys):
        return "--projector-embed-dims / --enc-type (one projector per encoder)"
    if any(k.startswith("pos_embed") for k in keys):
        return "--resolution or the patch size in --model"
    if any(k.startswith("y_embedder") for k in keys):
        return "--num-classes"
    return "--model"


def load_state_dict_checked(model, state_dict, source):
    """`model.load_state_dict(state_dict, strict=True)` with a one-line error listing what does not fit."""
    expected = model.state_dict()
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
        raise RegditError(f"{source} does not match the model: {'; '.join(parts)}; "
                          f"check {_setting_hint(missing + unexpected + mismatched)}")
    model.load_state_dict(state_dict, strict=True)


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


def model_config_from_checkpoint(checkpoint, state_dict=None, model_name=None, source="checkpoint", **overrides):
    """The SiTConfig of a checkpoint: regdit files store it; for official files it is read off the weights' shapes
    (`state_dict`, default its EMA weights) and the saved args. `model_name` (its size and patch, e.g. "SiT-XL/2")
    and `overrides` (SiTConfig fields, e.g. encoder_depth from the command line) win."""
    if "model_config" in checkpoint:
        values = dict(checkpoint["model_config"])
    else:
        values = _inferred_config(state_dict or checkpoint.get("ema", checkpoint.get("model")),
                                  vars(checkpoint.get("args") or argparse.Namespace()))
    values.pop("name", None)  # a label stored by earlier versions
    if model_name is not None:
        values.update(model_arguments(model_name))
    values.update(overrides)
    if values.get("num_heads") is None:
        raise RegditError(f"cannot tell the number of attention heads of {source}, a custom-size checkpoint: "
                          "pass --model with a standard size")
    return SiTConfig.from_dict(values, source)


def _inferred_config(weights, args):
    """The settings of official weights: sizes from the parameter shapes, encoder_depth from the saved args."""
    if any(k.startswith("decoder_blocks.") for k in weights):
        raise RegditError("these weights have the early REPA layout (decoder_blocks): pass --legacy")
    hidden_size, in_channels, patch_size, _ = weights["x_embedder.proj.weight"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in weights if k.startswith("blocks."))
    size = next((s for s, (d, w, _) in MODEL_SIZES.items() if (d, w) == (depth, hidden_size)), None)
    z_dims, k = [], 0
    while f"projectors.{k}.4.weight" in weights:
        z_dims.append(weights[f"projectors.{k}.4.weight"].shape[0])
        k += 1
    use_cls_token = "cls_projectors2.weight" in weights
    num_tokens = weights["pos_embed"].shape[1] - int(use_cls_token)
    return dict(
        input_size=int(num_tokens ** 0.5) * patch_size, patch_size=patch_size, in_channels=in_channels,
        hidden_size=hidden_size, depth=depth, num_heads=MODEL_SIZES[size][2] if size else args.get("num_heads"),
        num_classes=weights["y_embedder.embedding_table.weight"].shape[0] - 1,
        z_dims=z_dims, projector_dim=weights["projectors.0.0.weight"].shape[0] if z_dims else 2048,
        encoder_depth=args.get("encoder_depth", 8), use_cls_token=use_cls_token,
        qk_norm="blocks.0.attn.q_norm.weight" in weights)


def build_model_from_checkpoint(checkpoint, source="checkpoint", weights="ema", model_name=None, legacy=False,
                                fused_attn=True, **overrides):
    """`SiT(config)` with the checkpoint's `weights` ("ema" or "model") loaded strictly, the config from
    `model_config_from_checkpoint`; `source` names the checkpoint in errors. `legacy` renumbers official
    `decoder_blocks` weights first (`--legacy`)."""
    state_dict = checkpoint[weights]
    if legacy:
        args = vars(checkpoint.get("args") or argparse.Namespace())
        state_dict = convert_legacy_state_dict(state_dict, overrides.get("encoder_depth",
                                                                          args.get("encoder_depth", 8)))
    config = model_config_from_checkpoint(checkpoint, state_dict, model_name, source, **overrides)
    model = SiT(config, fused_attn=fused_attn)
    load_state_dict_checked(model, state_dict, source)
    return model


@dataclass
class ExportConfig:
    ckpt: str | None = flag(None, "a regdit or official training checkpoint (.pt)", positional=True, required=True)
    output: str | None = flag(None, "folder for model.safetensors and config.json", required=True)
    num_heads: int | None = flag(None, "attention heads, only needed for custom model sizes (standard sizes know "
                                       "theirs)")


def export(config: ExportConfig):
    """EMA weights as `model.safetensors` + `config.json` (the SiTConfig, latents, path type), the shareable form
    of a run. Returns the path of the weights."""
    checkpoint = load_checkpoint(config.ckpt)
    if "ema" not in checkpoint:
        raise RegditError(f"{config.ckpt} has no EMA weights (keys {', '.join(checkpoint)}): export a training "
                          "checkpoint")
    overrides = {"num_heads": config.num_heads} if config.num_heads else {}
    model_config = model_config_from_checkpoint(checkpoint, source=config.ckpt, **overrides)
    output_dir = Path(config.output)
    output_dir.mkdir(parents=True, exist_ok=True)
    ema = {k: v.contiguous() for k, v in checkpoint["ema"].items()}
    settings = dict(model=model_config.to_dict(), latents=checkpoint.get("latents"),  # regdit runs' VAE and scale
                    path_type=getattr(checkpoint.get("args"), "path_type", None))
    with atomic_write(output_dir / "config.json", "w") as f:
        f.write(json.dumps(settings, indent=2) + "\n")
    with atomic_write(output_dir / "model.safetensors") as f:
        f.write(save(ema, metadata={"format": "pt"}))
    print(f"wrote {output_dir / 'model.safetensors'}")
    return output_dir / "model.safetensors"

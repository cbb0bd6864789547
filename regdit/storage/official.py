"""Official REG/REPA checkpoints: what their weights and saved args say about the model (they store
no SiTConfig), and the early REPA layout (`decoder_blocks`, `--legacy`)."""
import argparse

from regdit import RegditError
from regdit.core.models import MODEL_SIZES

PATCH_WEIGHTS = "x_embedder.proj.weight"  # (hidden_size, in_channels, patch_size, patch_size)


def convert_legacy_state_dict(state_dict, encoder_depth):
    """`--legacy` (REPA's load_legacy_checkpoints): early checkpoints kept the blocks after the
    projection layer in `decoder_blocks.i`; they are `blocks.{i + encoder_depth}` here."""
    converted = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "decoder_blocks":
            parts[:2] = ["blocks", str(int(parts[1]) + encoder_depth)]
        converted[".".join(parts)] = value
    return converted


def saved_args(checkpoint, source):
    """The training flags an official checkpoint saved (`args`, an argparse.Namespace) as a dict; {}
    without."""
    args = checkpoint.get("args")
    if args is None or isinstance(args, dict):
        return args or {}
    if not isinstance(args, argparse.Namespace):
        raise RegditError(f"{source}: its args are a {type(args).__name__}, not the settings of a "
                          "training run: pass a training checkpoint (.pt) or an export "
                          "(.safetensors)")
    return vars(args)


def inferred_config(weights, args, source="checkpoint"):
    """The settings of official weights: sizes from the parameter shapes, encoder_depth from the
    saved args. A SiT parameter that is missing or of another rank is one line naming `source`."""
    if any(k.startswith("decoder_blocks.") for k in weights):
        raise RegditError("these weights have the early REPA layout (decoder_blocks): "
                          "pass --legacy")

    def shape(key, ndim):
        tensor = weights.get(key)
        if tensor is None or tensor.ndim != ndim:
            found = "missing" if tensor is None else f"{tensor.ndim}-D {list(tensor.shape)}"
            raise RegditError(f"{source} has no SiT weights to read the model from ({key}: "
                              f"{found}, not {ndim}-D): pass a regdit or official SiT checkpoint")
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
        input_size=int(num_tokens ** 0.5) * patch_size, patch_size=patch_size,
        in_channels=in_channels, hidden_size=hidden_size, depth=depth,
        num_heads=MODEL_SIZES[size][2] if size else args.get("num_heads"),
        num_classes=shape("y_embedder.embedding_table.weight", 2)[0] - 1,
        z_dims=z_dims, projector_dim=shape("projectors.0.0.weight", 2)[0] if z_dims else 2048,
        encoder_depth=args.get("encoder_depth", 8), use_cls_token=use_cls_token,
        qk_norm="blocks.0.attn.q_norm.weight" in weights)

"""`regdit export`: a checkpoint's EMA weights in the export format (`checkpoint.write_export`), a
model card, and `--push-to-hub`, which uploads exactly the export's files."""
import argparse
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import PIL.Image
from huggingface_hub import CommitOperationAdd, ModelCardData, constants
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from safetensors import safe_open

from regdit import RegditError
from regdit.config import Settings, flag
from regdit.files import (
    atomic_write,
    check_output,
    file_kind,
    read_head,
    remove_temp_files,
    temp_file_target,
)
from regdit.run.runlock import LOCK_NAME, RunLock
from regdit.storage.checkpoint import (
    error_reason,
    load_checkpoint,
    local_checkpoint,
    model_config_from_checkpoint,
    write_export,
)

# far above any sample grid, below PIL's bomb warning
MAX_GRID_BYTES, MAX_GRID_PIXELS = 64 << 20, 8192 * 8192


@dataclass
class ExportConfig(Settings):
    ckpt: str | None = flag(None, "a regdit or official training checkpoint (.pt), local or hf://",
                            positional=True, required=True)
    output: str | None = flag(None, "folder for model.safetensors, config.json and the model card "
                                    "README.md: new, empty or an earlier export", required=True)
    num_heads: int | None = flag(None, "attention heads, only needed for custom model sizes "
                                       "(standard sizes know theirs)", at_least=1)
    push_to_hub: str | None = flag(None, "then upload the export's files to this Hub repository, "
                                         "created if missing (token: HF_TOKEN or `hf auth login`)",
                                   metavar="OWNER/NAME")
    private: bool = flag(False, "with --push-to-hub: create the repository private")
    metrics: str | None = flag(None, "a `regdit eval` metrics JSON to show on the model card",
                               metavar="JSON")
    grid: str | None = flag(None, "sample grid image for the model card (default: the run's "
                                  "preview at the checkpoint's step, EXP/samples/STEP.png, if "
                                  "there is one)", metavar="PNG")
    license: str = flag("mit", "license of the model card, a Hub license id (mit, apache-2.0, "
                               "cc-by-nc-4.0, other)")

    def check(self):
        if self.private and self.push_to_hub is None:
            raise RegditError("--private applies to the repository --push-to-hub creates: add "
                              "--push-to-hub OWNER/NAME or drop --private")
        if self.push_to_hub == "":
            raise RegditError("--push-to-hub '' names no repository: pass OWNER/NAME, or drop "
                              "--push-to-hub to export only")
        if self.push_to_hub is not None:
            check_repo_id(self.push_to_hub, "--push-to-hub")
            if constants.HF_HUB_OFFLINE:  # refused before anything is read or written
                raise RegditError(f"--push-to-hub {self.push_to_hub} needs the network but "
                                  "HF_HUB_OFFLINE=1 is set: unset it, or drop --push-to-hub to "
                                  "export only")


# training settings shown on the model card, when recorded (official checkpoints' args spell two of
# them cls, cfg_prob)
CARD_SETTINGS = ("enc_type", "encoder_depth", "proj_coeff", "cls_coeff", "cls", "batch_size",
                 "learning_rate", "ema_decay", "class_dropout_prob", "cfg_prob", "weighting",
                 "init_from")


METHODS = {"reg": "REG (entangled class token + REPA alignment)", "repa": "REPA (alignment only)",
           "sit": "SiT"}


def read_eval_metrics(path):
    """The five metrics and the settings of a `regdit eval` JSON, checked: a one-line error
    otherwise."""
    # the evaluator's imports only when a card shows metrics
    from regdit.commands.evaluate import METRIC_NAMES

    # never opened: reading a FIFO would wait forever
    if Path(path).exists() and not Path(path).is_file():
        raise RegditError(f"--metrics {path} is {file_kind(os.stat(path).st_mode)}, not a file: "
                          "pass the JSON `regdit eval` wrote")
    try:
        results = json.loads(read_head(path, MAX_METRICS_BYTES))
    except (OSError, ValueError) as error:
        raise RegditError(f"--metrics {path} is unreadable ({error_reason(error)}): pass the JSON "
                          "`regdit eval` wrote") from None
    if not isinstance(results, dict) or not all(isinstance(results.get(k), (int, float))
                                                for k in METRIC_NAMES):
        raise RegditError(f"--metrics {path} is not a `regdit eval` metrics JSON (it needs "
                          f"{', '.join(METRIC_NAMES)})")
    return {name: results[key] for key, name in METRIC_NAMES.items()}, results.get("settings") or {}


MAX_METRICS_BYTES = 1 << 20  # a metrics JSON is about 700 bytes


def check_grid(path):
    """One line unless `path` is an image that PIL decodes whole, of at most MAX_GRID_BYTES and
    MAX_GRID_PIXELS."""
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise RegditError(f"--grid {path} does not exist: pass a sample grid image") from None
    if not stat.S_ISREG(info.st_mode):  # never opened: reading a FIFO would wait forever
        raise RegditError(f"--grid {path} is {file_kind(info.st_mode)}, not an image file: pass a "
                          "sample grid image")
    if info.st_size > MAX_GRID_BYTES:
        raise RegditError(f"--grid {path} has {info.st_size / 2**20:.0f} MiB, more than a sample "
                          f"grid's {MAX_GRID_BYTES >> 20} MiB: pass a smaller image")
    try:
        with PIL.Image.open(path) as image:
            if image.width * image.height > MAX_GRID_PIXELS:
                raise RegditError(f"--grid {path} is {image.width}x{image.height} px, more than a "
                                  f"sample grid's {MAX_GRID_PIXELS} pixels: pass a smaller image")
            image.load()
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
        # PIL's unreadable file
        raise RegditError(f"--grid {path} is not a readable image ({error_reason(error)}): pass a "
                          "sample grid image (PNG or JPEG)") from None


def foreign_to_export(folder):
    """None for a folder that holds an earlier export alone (EXPORT_FILES and its samples.<ext>
    grid; the temp files and the lock of a killed export, which its rerun removes), else what else
    is in it."""
    def exported(path):
        name = temp_file_target(path.name) or path.name
        return name in EXPORT_FILES or (Path(name).stem == "samples" and path.is_file())

    others = sorted(p.name for p in folder.iterdir()
                    if not (exported(p) or p.name.startswith(LOCK_NAME)))
    if others:
        return (f"it holds {', '.join(others[:3])}{' ...' if len(others) > 3 else ''}, which an "
                f"export does not (an export folder holds {', '.join(EXPORT_FILES)} and "
                "samples.<ext> only)")
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
    return (None if b"library_name: regdit" in read_head(path, 4096)
            else "it is not the model card of an export")


# with the sample grid samples.<ext>: what `regdit export` writes
EXPORT_FILES = {"model.safetensors": foreign_to_weights, "config.json": foreign_to_settings,
                "README.md": foreign_to_card}


def check_export_folder(folder, grid_name, inputs):
    """One line, before any work, unless `folder` is new, empty or an earlier export, and none of
    the files the export writes there (EXPORT_FILES, the grid `grid_name`) is another's file or one
    of the `inputs`."""
    check_output(folder, "--output", foreign_to_export, folder=True)
    for name, foreign in {**EXPORT_FILES, **({grid_name: None} if grid_name else {})}.items():
        check_output(folder / name, "--output", foreign, inputs)


def export(config: ExportConfig):
    """EMA weights as `model.safetensors` + `config.json` (the SiTConfig, latents, path type), the
    shareable form of a run, with a model card README.md (and the sample grid it shows);
    `--push-to-hub` uploads exactly these files. Writes into a new or empty folder, or over an
    earlier export. Returns the path of the weights."""
    grid = Path(config.grid) if config.grid else None
    output_dir = Path(config.output)
    check_export_folder(output_dir, grid and f"samples{grid.suffix}",
                        {"checkpoint": config.ckpt, "--grid": config.grid,
                         "--metrics": config.metrics})
    if grid is not None:
        check_grid(grid)
    metrics = read_eval_metrics(config.metrics) if config.metrics else None
    ckpt = local_checkpoint(config.ckpt)
    checkpoint = load_checkpoint(ckpt)
    if "ema" not in checkpoint:
        raise RegditError(f"{config.ckpt} has no EMA weights (keys {', '.join(checkpoint)}): "
                          "export a training checkpoint")
    overrides = {"num_heads": config.num_heads} if config.num_heads else {}
    model_config = model_config_from_checkpoint(checkpoint, source=config.ckpt, **overrides)
    latents = checkpoint.get("latents")  # regdit runs' VAE and scale
    path_type = getattr(checkpoint.get("args"), "path_type", None)
    # one export at a time into a folder; a killed one's temp files go
    with RunLock(output_dir, "export"):
        remove_temp_files(output_dir)
        weights = write_export(output_dir, checkpoint["ema"], model_config, latents, path_type,
                               checkpoint.get("classes"))
        print(f"wrote {weights}")
        written = [weights.name, "config.json", "README.md"]
        # a regdit run's grid at this checkpoint's step
        preview = ckpt.parent.parent / "samples" / f"{ckpt.stem}.png"
        grid = grid or (preview if preview.is_file() else None)
        if grid is not None:
            written.append(f"samples{grid.suffix}")
            with atomic_write(output_dir / written[-1]) as f:
                f.write(grid.read_bytes())
        rows = card_rows(checkpoint, model_config, latents, path_type)
        ckpt_ref = (f"hf://{config.push_to_hub}/model.safetensors" if config.push_to_hub
                    else str(weights))
        card = model_card(config.push_to_hub or output_dir.name, rows, metrics,
                          grid and f"samples{grid.suffix}", ckpt_ref,
                          config.push_to_hub or str(output_dir), config.license)
        with atomic_write(output_dir / "README.md", "w") as f:
            f.write(card)
        print(f"wrote {output_dir / 'README.md'} (model card)"
              + ("" if grid else "; no sample grid: pass --grid PNG"))
        if config.push_to_hub:
            url = push_folder(output_dir, written, config.push_to_hub, config.private,
                              f"{model_config.display_name} exported by regdit from {ckpt.name}")
            print(f"pushed {', '.join(written)} of {output_dir} to {url}")
    return weights


def card_rows(checkpoint, model_config, latents, path_type):
    """The model card's table of the training settings: {name: value}."""
    training = checkpoint.get("config") or vars(checkpoint.get("args") or argparse.Namespace())
    method = "reg" if model_config.use_cls_token else "repa" if model_config.z_dims else "sit"
    parameters = sum(v.numel() for v in checkpoint["ema"].values()) / 1e6
    recorded = latents or {}
    return {"model": f"{model_config.display_name} ({parameters:.1f}M parameters)",
            "method": METHODS[method], "training steps": checkpoint.get("steps", "not recorded"),
            "classes": model_config.num_classes,
            "resolution": recorded.get("resolution") or training.get("resolution", "not recorded"),
            "latents": recorded.get("vae") or "not recorded (official checkpoints: sd-vae-ft-ema)",
            "path type": path_type or "linear",
            **{k: training[k] for k in CARD_SETTINGS if training.get(k) is not None}}


def check_repo_id(repo_id, flag):
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise RegditError(f"{flag} {repo_id}: not a Hub repository id "
                          f"({str(error).splitlines()[0]}); write OWNER/NAME") from None


def model_card(title, settings, metrics, grid, ckpt, pretrained, license):
    """README.md of an export: a Hub model card, its YAML front matter from huggingface_hub's
    `ModelCardData` (license, library, tags: what the Hub shows and filters on), then the model and
    training `settings`, the `metrics` of a `regdit eval` JSON ((names -> values, eval settings) or
    None), the sample `grid` image (a file name in the folder, or None) and how to sample `ckpt` /
    load `pretrained`."""
    data = ModelCardData(license=license, library_name="regdit",
                         pipeline_tag="unconditional-image-generation",
                         tags=["regdit", "diffusion", "sit", "reg", "repa", "class-conditional",
                               "image-generation"])
    lines = [f"---\n{data.to_yaml()}\n---", f"# {title}", "",
             "A class-conditional SiT diffusion transformer trained with regdit (REG, "
             "Representation Entanglement for Generation, arXiv 2507.01467). `model.safetensors` "
             "holds the EMA weights, `config.json` the architecture.", ""]
    if grid:
        lines += [f"![samples]({grid})", ""]
    lines += ["## Settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in settings.items()]
    if metrics:
        values, eval_settings = metrics
        ref = Path(str(eval_settings.get("ref_batch", "not recorded"))).name
        lines += ["", "## Metrics", "",
                  f"`regdit eval` (ADM evaluator) on {eval_settings.get('num_samples', '?')} "
                  f"samples against `{ref}`:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value:.4f} |" for name, value in values.items()]
    lines += ["", "## Use", "",
              "With regdit (REG's published guidance: `--cfg-scale 2.3 --cls-cfg-scale 2.3 "
              "--guidance-high 0.85`):", "",
              "```bash", f"regdit sample --ckpt {ckpt} --num-fid-samples 50000", "```", "",
              "```python", "from regdit import from_pretrained", "",
              f'model = from_pretrained("{pretrained}")', "```", ""]
    return "\n".join(lines)


def push_folder(folder, files, repo_id, private, message):
    """Create the Hub repository `repo_id` if missing and upload exactly `files` (names in `folder`)
    in one commit: nothing else that lies in the folder is sent. Returns the repository's URL."""
    api = huggingface_hub.HfApi()
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(Path(folder) / name))
                  for name in files]
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.create_commit(repo_id, operations, commit_message=message)
    except Exception as error:
        # authentication, permissions, network: all the user's to fix, said in one line
        detail = (str(error).splitlines() or [""])[0][:200]
        raise RegditError(f"cannot push {folder} to {repo_id} ({type(error).__name__}: {detail}): "
                          "log in with write access (`hf auth login` or HF_TOKEN); the export is "
                          "complete, and the same command pushes it again") from None
    return str(url)

"""`regdit app`: a page in the browser that shows what a model draws, with `regdit sample`'s own
functions.

The model is loaded once; requests queue and run one at a time. A grid is sample indices 0..n-1 of
one class: image i of seed s is sample i of `regdit sample --global-seed s --class-label C
--num-fid-samples n --per-proc-batch-size n` with the same sampling flags (the batch size decides
the float rounding), bit for bit on the same device, and the page shows that command under the
grid. The comparison mode draws the same seeds under a second setting, side by side.

The page is served by Gradio (`pip install -e '.[app]'`) on --host:--port, without share links or
telemetry; Gradio keeps the images it serves in its temporary folder (GRADIO_TEMP_DIR).
"""
import dataclasses
import html
import importlib.resources
import importlib.util
import math
import os
import random
import re
import shlex
import socket
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from regdit import RegditError
from regdit.commands.sample import (
    SampleConfig,
    Sampling,
    check_class_label,
    check_guidance,
    load_guide,
    load_model_and_vae,
    sample_batch,
    vae_geometry,
)
from regdit.commands.train import EvalSampling, PreviewSampling
from regdit.config import Settings, flag
from regdit.core.samplers import SAMPLERS
from regdit.extras.demo import SAMPLE_RECIPE, TRAIN_RECIPE, DemoConfig
from regdit.files import atomic_write

INSTALL = "pip install -e '.[app]'"
WHOLE_SETTINGS = ("class_label", "seed", "num_images", "num_steps")
# what the page calls the settings whose field is not the flag's name
FIELD_NAMES = {"seed": "--global-seed", "num_images": "images"}
# REG's setting for its published SiT-XL/2 (the official README and eval.sh: FID 1.36)
PAPER_SAMPLING = Sampling(sampler="sde", num_steps=250, cfg_scale=2.3, cls_cfg_scale=2.3,
                          guidance_low=0.0, guidance_high=0.85)


def imagenet_classes():
    """ImageNet's 1000 class names in class-index order (torchvision's list)."""
    text = importlib.resources.files("regdit.extras").joinpath("imagenet_classes.txt").read_text()
    return text.splitlines()


def class_names(num_classes, recorded=None):
    """The name of each class: `recorded` (the dataset's, from a checkpoint or export), else
    ImageNet's for a 1000-class model, else "class N"; a class beyond the recorded names is
    "class N" too."""
    if not recorded and num_classes == 1000:
        return imagenet_classes()
    recorded = recorded or []
    return [recorded[i] if i < len(recorded) else f"class {i}" for i in range(num_classes)]


def model_calls(sampling):
    """The model calls of one grid under `sampling`, for the progress bar: one per step (guidance
    doubles the batch, not the calls); Heun two, but on its last step."""
    return 2 * sampling.steps - 1 if sampling.sampler == "heun" else sampling.steps


def absolute(path):
    """A local file or folder as an absolute path, so that the command runs from any folder; Hub
    ids, hf:// paths and VAE names as they are."""
    return os.path.abspath(path) if path and os.path.exists(path) else path


def visible_gpu(index):
    """What CUDA_VISIBLE_DEVICES names GPU `index` of this process (the variable may renumber)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",")[index].strip() if visible else str(index)


def sample_command(config, device):
    """The `regdit sample` command that draws the grid of `config` (a SampleConfig) as the app does:
    every flag that decides the images, and the device when `regdit sample` would pick another
    (it takes the first GPU it sees)."""
    sampling = config.sampling
    vae = absolute(config.vae)
    flags = ["--ckpt", absolute(config.ckpt), *(["--vae", vae] if vae else []),
             "--class-label", config.class_label, "--global-seed", config.global_seed,
             "--num-fid-samples", config.num_fid_samples,
             "--per-proc-batch-size", config.per_proc_batch_size,
             "--sampler", sampling.sampler, "--num-steps", sampling.steps,
             "--cfg-scale", sampling.cfg_scale, "--cls-cfg-scale", sampling.cls_cfg_scale,
             "--guidance-low", sampling.guidance_low, "--guidance-high", sampling.guidance_high]
    if sampling.guide_ckpt:
        flags += ["--guide-ckpt", absolute(sampling.guide_ckpt)]
    if config.mixed_precision != "no":
        flags += ["--mixed-precision", config.mixed_precision]
    command = shlex.join(["regdit", "sample", *map(str, flags)])
    if device.type == "cpu" and torch.cuda.is_available():
        return "CUDA_VISIBLE_DEVICES= " + command
    if device.type == "cuda" and (device.index or os.environ.get("CUDA_VISIBLE_DEVICES")):
        return f"CUDA_VISIBLE_DEVICES={visible_gpu(device.index or 0)} " + command
    return command


def opening_sampling(stored, model_config):
    """(Sampling, where it comes from) that the page opens on: what the checkpoint was drawn with.
    REG's paper setting for an official REG checkpoint; the demo's sampling for a run of the demo's
    recipe (`regdit demo`, or the README's commands); else the run's previews' sampling
    (experiment.SamplePreview), else its evaluations' (--eval-*), else `regdit sample`'s
    defaults."""
    settings = stored.get("settings") or {}
    if stored.get("official") and model_config.use_cls_token:
        return PAPER_SAMPLING, "REG's paper setting (SDE 250 steps, guidance 2.3 in [0, 0.85])"
    if settings and all(settings.get(key) == value for key, value in TRAIN_RECIPE.items()):
        steps = next(f.default for f in dataclasses.fields(DemoConfig)
                     if f.name == "sampling_steps")
        return (Sampling(num_steps=steps, **SAMPLE_RECIPE),
                f"the demo's sampling (SDE {steps} steps, guidance 2)")
    if settings.get("sampling_steps"):
        # drawn without guidance when the run had no label dropout (SamplePreview)
        preview = recorded_sampling(settings, PreviewSampling)
        if model_config.class_dropout_prob == 0:
            preview = dataclasses.replace(preview, cfg_scale=1.0)
        return preview, "the sampling of the run's preview grids"
    if settings.get("eval_every"):
        return recorded_sampling(settings, EvalSampling), "the sampling of the run's evaluations"
    return Sampling(), "`regdit sample`'s defaults"


def recorded_sampling(settings, sampling_class):
    """The Sampling of a run's --preview-* or --eval-* settings (the class's defaults for those a
    run of an earlier regdit did not record), without its guiding model: the page has its own."""
    prefix = sampling_class.FLAG_PREFIX
    recorded = {f.name: settings[f"{prefix}_{f.name}"] for f in dataclasses.fields(Sampling)
                if f"{prefix}_{f.name}" in settings and f.name != "guide_ckpt"}
    return Sampling(**{f.name: getattr(sampling_class(**recorded), f.name)
                       for f in dataclasses.fields(Sampling) if f.name != "guide_ckpt"})


def slug(text):
    """A class name as part of a file name: `red triangle` -> `red-triangle`."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "class"


def check_number(value, name, whole=False):
    """A value of the page (or of a raw queue request) as a number: one line naming the flag when it
    is not one."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RegditError(f"{name} {value!r}: enter a number")
    if not math.isfinite(value):
        raise RegditError(f"{name} {value}: must be a finite number")
    if whole and value != int(value):
        raise RegditError(f"{name} {value}: must be a whole number")
    return int(value) if whole else float(value)


@dataclass
class AppConfig(Settings):
    ckpt: str | None = flag(None, "checkpoint to look at: a regdit or official .pt (EMA weights) "
                                  "or an exported .safetensors, local or "
                                  "hf://OWNER/REPO/PATH[@REVISION]", required=True)
    vae: str | None = flag(None, "as `regdit sample --vae` (unset: the checkpoint's VAE, else none "
                                 "for 3-channel models, else ema)")
    guide_ckpt: str | None = flag(None, "as `regdit sample --guide-ckpt`: autoguidance by this "
                                        "checkpoint, with the page's guidance scale",
                                  metavar="CKPT")
    host: str = flag("127.0.0.1", "address to serve the page on (0.0.0.0: every network "
                                  "interface)")
    port: int = flag(7860, "port to serve the page on", at_least=1, at_most=65535)
    device: str | None = flag(None, "cpu, cuda or cuda:N (default: cuda when there is a GPU, else "
                                    "cpu)")
    mixed_precision: str = flag("no", "autocast of the model call: no (float32) or bf16 (GPU "
                                      "only)", choices=["no", "bf16"])
    max_images: int = flag(16, "the most images a grid may have", at_least=1)
    max_steps: int = flag(1000, "the most sampling steps a grid may have (a request holds the "
                                "model until it is drawn)", at_least=1)

    def check(self):
        if self.device is not None:
            try:
                device = torch.device(self.device)
            except RuntimeError:
                device = None
            if device is None or device.type not in ("cpu", "cuda"):
                raise RegditError(f"--device {self.device}: pass cpu, cuda or cuda:N")
            gpus = torch.cuda.device_count()
            if device.type == "cuda" and (device.index or 0) >= gpus:
                raise RegditError(f"--device {self.device}: " + (
                    f"torch sees {gpus} GPUs, cuda:0 to cuda:{gpus - 1}" if gpus
                    else "torch sees no GPU here; pass --device cpu"))
        if self.mixed_precision == "bf16" and self.torch_device.type != "cuda":
            raise RegditError("--mixed-precision bf16 runs on a GPU only: pass --mixed-precision "
                              "no on the CPU")

    @property
    def torch_device(self):
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))


class Explorer:
    """The model, its VAE and class names, loaded once; draws grids as `regdit sample` does."""

    def __init__(self, config):
        self.config, self.device = config, config.torch_device
        defaults = SampleConfig(ckpt=config.ckpt, vae=config.vae)
        # as `regdit sample` sets it (TF32 matmuls on the GPU)
        torch.backends.cuda.matmul.allow_tf32 = defaults.tf32
        self.model, self.vae, _, _, stored = load_model_and_vae(defaults, self.device)
        self.path_type = stored.get("path_type") or "linear"
        self.latent_norm = stored["latent_norm"]
        self.guide = load_guide(config.guide_ckpt, self.model, stored, self.device)
        self.classes = class_names(self.model.num_classes, stored.get("classes"))
        self.opening = opening_sampling(stored, self.model.config)
        # the grids' PNGs and zips, served by Gradio under their names; removed at exit
        self.files = tempfile.TemporaryDirectory(prefix="regdit-app-", dir=gradio_temp_dir())
        # Requests run on a server thread, where OpenMP may use another thread count than the main
        # thread's, and the thread count can decide the float rounding on the CPU: theirs is this.
        self.threads = torch.get_num_threads()
        # One draw at a time on the shared model (the queue serialises the page's requests; this
        # holds for any other caller too): its forward hook and thread count are per draw.
        self.lock = threading.Lock()

    def grid_config(self, class_label, seed, num_images, **sampling):
        """The SampleConfig of a grid; bad values are one line naming the flag (as on the command
        line)."""
        values = dict(class_label=class_label, seed=seed, num_images=num_images, **sampling)
        empty = [FIELD_NAMES.get(name, f"--{name.replace('_', '-')}")
                 for name, value in values.items() if value is None]
        if empty:
            raise RegditError(f"{', '.join(empty)}: empty; enter a value")
        values = {name: check_number(value, FIELD_NAMES.get(name, f"--{name.replace('_', '-')}"),
                                     whole=name in WHOLE_SETTINGS)
                  if name != "sampler" else value for name, value in values.items()}
        class_label, seed, num_images = (values.pop(name) for name in ("class_label", "seed",
                                                                        "num_images"))
        if num_images > self.config.max_images:
            raise RegditError(f"{num_images} images: at most {self.config.max_images} per grid "
                              "(regdit app --max-images)")
        sampling = values  # checked numbers: floats, whole numbers as int (JSON gives 2 for 2.0)
        config = SampleConfig(ckpt=self.config.ckpt, vae=self.config.vae,
                              sampling=Sampling(**sampling, guide_ckpt=self.config.guide_ckpt),
                              global_seed=seed,
                              class_label=class_label, num_fid_samples=num_images,
                              per_proc_batch_size=num_images,
                              mixed_precision=self.config.mixed_precision)
        if config.sampling.steps > self.config.max_steps:
            raise RegditError(f"--num-steps {config.sampling.steps}: at most "
                              f"{self.config.max_steps} per grid (regdit app --max-steps)")
        check_guidance(self.model, config.sampling)
        check_class_label(config.class_label, self.model.num_classes)
        return config

    def draw(self, config, on_model_call=None):
        """uint8 images (N, H, W, 3): sample_batch of indices 0..N-1, as `regdit sample` draws them
        with `config`; `on_model_call()` runs after every model call."""
        with self.lock:
            torch.set_num_threads(self.threads)
            hook = (self.model.register_forward_hook(lambda *_: on_model_call())
                    if on_model_call else None)
            try:
                return sample_batch(self.model, self.vae, range(config.num_fid_samples),
                                    config.sampling, config.global_seed,
                                    mixed_precision=config.mixed_precision,
                                    path_type=self.path_type, class_label=config.class_label,
                                    latent_norm=self.latent_norm, guide=self.guide)
            finally:
                if hook is not None:
                    hook.remove()

    def command(self, config):
        return sample_command(config, self.device)

    def save_grid(self, images, config, command, name):
        """The grid's PNGs, named like `red-triangle-seed-7-000003.png`, and a zip of them with the
        command, in a new folder of the app's temporary folder; returns (PNG paths, zip path)."""
        stem = f"{slug(self.classes[config.class_label])}-seed-{config.global_seed}"
        folder = Path(tempfile.mkdtemp(prefix=f"grid-{name}-", dir=self.files.name))
        paths = [folder / f"{stem}-{index:06d}.png" for index in range(len(images))]
        for path, image in zip(paths, images):
            Image.fromarray(image).save(path)
        archive = folder / f"{stem}-grid-{name}.zip"
        with atomic_write(archive) as f, zipfile.ZipFile(f, "w") as bundle:
            for path in paths:
                bundle.write(path, path.name)
            bundle.writestr("command.txt", command + "\n")
        return paths, archive

    def describe(self):
        """One line: the checkpoint, the model, its classes and resolution, the device."""
        model, config = self.model, self.config
        resolution = model.input_size * vae_geometry(self.vae)[1]
        precision = ", bf16" if config.mixed_precision == "bf16" else ""
        return (f"`{config.ckpt}`: {model.config.display_name}, {model.num_classes} classes, "
                f"{resolution} px, on {self.device}{precision}")


def import_gradio(cache):
    """Gradio, without telemetry: nothing of the app leaves this machine. Matplotlib, which Gradio
    imports, keeps its cache in `cache` (the app's temporary folder), not in the user's home."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["MPLCONFIGDIR"] = os.environ.get("MPLCONFIGDIR") or cache
    try:
        import gradio
    except ImportError as error:
        raise RegditError(f"regdit app needs Gradio: {INSTALL} ({error})") from None
    return gradio


def check_port(host, port):
    """Refuse a port in use (or a host that is not this machine's) before the model loads."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as error:
        raise RegditError(f"--host {host} --port {port}: cannot serve there "
                          f"({error.strerror or error}); pass another --port, or stop what uses "
                          "it") from None


# The page's name, flag and one-line help of each sampling setting.
SETTING_WORDS = {
    "sampler": ("Sampler", "--sampler", "sde: the official Euler-Maruyama; ode: Euler; heun: Heun "
                                        "(two model calls a step)"),
    "num_steps": ("Steps", "--num-steps", "more steps are slower and finer"),
    "cfg_scale": ("Guidance", "--cfg-scale", "classifier-free guidance of the image; 1 is none"),
    "cls_cfg_scale": ("Class-token guidance", "--cls-cfg-scale",
                      "guidance of REG's class token; 0 follows its conditional drift"),
    "guidance_low": ("Guidance from t", "--guidance-low", "guidance only where t is at least this"),
    "guidance_high": ("Guidance up to t", "--guidance-high",
                      "guidance only where t is at most this (t = 1 is noise)"),
}


def words(name):
    """gr component keywords: a plain-word label with the flag, and its help."""
    label, flag_name, help_line = SETTING_WORDS[name]
    # wide enough for the label on one line: three to a row at 1400 px, one on a phone
    return dict(label=f"{label} ({flag_name})", info=help_line, min_width=200)


def settings_column(gr, name, opening, max_steps):
    """The sampling settings of one grid, as {Sampling field: component}, opening on `opening`;
    sliders where the range is known."""
    with gr.Row():  # wraps where the column is narrow
        fields = dict(
            sampler=gr.Dropdown(list(SAMPLERS), value=opening.sampler, **words("sampler"),
                                elem_id=f"sampler-{name}"),
            num_steps=gr.Slider(1, max_steps, value=min(opening.steps, max_steps), step=1,
                                **words("num_steps"), elem_id=f"steps-{name}"),
            cfg_scale=gr.Number(opening.cfg_scale, **words("cfg_scale"),
                                elem_id=f"cfg-{name}"),
            cls_cfg_scale=gr.Number(opening.cls_cfg_scale, **words("cls_cfg_scale"),
                                    elem_id=f"cls-cfg-{name}"),
            guidance_low=gr.Slider(0, 1, value=opening.guidance_low, step=0.01,
                                   **words("guidance_low"), elem_id=f"low-{name}"),
            guidance_high=gr.Slider(0, 1, value=opening.guidance_high, step=0.01,
                                    **words("guidance_high"), elem_id=f"high-{name}"))
    # each sampler's own number of steps when it is picked
    fields["sampler"].change(lambda sampler: Sampling(sampler=sampler).steps, fields["sampler"],
                             fields["num_steps"], api_visibility="private")
    return fields


def results(gr, name):
    """The grid, the command that draws it and its zip, of one column."""
    gallery = gr.Gallery(label=f"grid {name}", format="png", columns=4, object_fit="contain",
                         buttons=["download", "fullscreen"], elem_id=f"grid-{name}")
    command = gr.Textbox(label=f"the same grid from the command line ({name})", lines=3,
                         interactive=False, buttons=["copy"], elem_id=f"command-{name}")
    archive = gr.DownloadButton("download all (.zip)", visible=False, size="sm",
                                elem_id=f"zip-{name}")
    return gallery, command, archive


def build_page(gr, explorer):
    """The page: class, seed and number of images for both grids; sampling settings, grid and
    command per column, opening on the checkpoint's own sampling; the second column only in
    comparison mode. Each grid is its own event with its own progress bar, and is drawn again only
    when its command changed."""
    classes = [(f"{name} ({i})", i) for i, name in enumerate(explorer.classes)]
    opening, source = explorer.opening
    with gr.Blocks(title="regdit app", analytics_enabled=False, delete_cache=(600, 3600)) as page:
        gr.Markdown(f"## regdit app\n{explorer.describe()}. Opens on {source}.")
        with gr.Row(equal_height=True):
            class_label = gr.Dropdown(classes, value=0, label="Class (--class-label)", scale=3,
                                      min_width=200, elem_id="class")
            seed = gr.Number(0, label="Seed (--global-seed)",
                             min_width=140, elem_id="seed")
            randomise = gr.Button("random seed", size="sm", min_width=100, elem_id="random-seed")
            num_images = gr.Slider(1, explorer.config.max_images,
                                   value=min(8, explorer.config.max_images), step=1,
                                   label="Images (--num-fid-samples)", min_width=180,
                                   elem_id="images")
            compare = gr.Checkbox(False, label="compare with a second setting", min_width=160,
                                  elem_id="compare")
            button = gr.Button("Generate", variant="primary", min_width=120, elem_id="generate")
        randomise.click(lambda: random.randrange(2**32), None, seed, api_visibility="private")
        columns, shown = {}, {}
        with gr.Row(elem_id="grids"):
            for name in ("A", "B"):
                with gr.Column(visible=name == "A", min_width=320) as column:
                    columns[name] = (settings_column(gr, name, opening, explorer.config.max_steps),
                                     results(gr, name))
                    shown[name] = gr.State(None)  # the command of the grid on show
            column_b = column
        compare.change(lambda on: gr.Column(visible=on), compare, column_b,
                       api_visibility="private")
        shared = dict(class_label=class_label, seed=seed, num_images=num_images, compare=compare)
        inputs = {*shared.values(), *shown.values(),
                  *(field for settings, _ in columns.values() for field in settings.values())}
        event, settings = button.click, {name: column[0] for name, column in columns.items()}
        for name, (_, outputs) in columns.items():
            generate = grid_event(gr, explorer, shared, settings, name, shown[name])
            # preprocess=False: the values as sent, checked by grid_config in one line each (a raw
            # request to the queue may send anything)
            event = event(generate, inputs, [*outputs, shown[name]], preprocess=False,
                          show_progress_on=outputs[0], api_visibility="private").success
    return page


def grid_event(gr, explorer, shared, settings, name, shown):
    """The function that draws grid `name` (A, or B in comparison mode) from the page's values:
    every grid's settings are checked first; a grid whose command is the one on show is kept."""
    def generate(values, progress=gr.Progress()):  # noqa: B008 (Gradio's progress tracker)
        common = {key: values[component] for key, component in shared.items()}
        sides = ["A", "B"] if common.pop("compare") else ["A"]
        if name not in sides:
            return [gr.skip()] * 4
        try:
            configs = {side: explorer.grid_config(**common, **{
                key: values[component] for key, component in settings[side].items()})
                for side in sides}
            config = configs[name]
            command = explorer.command(config)
            if command == values[shown]:
                return [gr.skip()] * 4
            total, done = model_calls(config.sampling), 0

            def model_called():
                nonlocal done
                done += 1
                progress((min(done, total), total), desc=f"grid {name}", unit="model calls")
            images = explorer.draw(config, model_called)
            files, archive = explorer.save_grid(images, config, command, name)
        except RegditError as error:
            raise gr.Error(html.escape(str(error), quote=False), print_exception=False) from None
        return [[(str(path), path.name) for path in files], command,
                gr.DownloadButton(value=archive, visible=True), command]
    return generate


# Small images shown large keep their pixels sharp; a grid is as tall as its images (Gradio's
# gallery keeps at least 450 px) and its columns reflow with the width; a command is shown whole at
# any width (its box grows with its text).
CSS = """#grid-A img, #grid-B img { image-rendering: pixelated; }
#grid-A .grid-wrap, #grid-B .grid-wrap { min-height: 0; max-height: none; }
#grid-A .grid-container, #grid-B .grid-container {
  grid-template-columns: repeat(auto-fill, minmax(min(100%, 96px), 1fr)) !important; }
#command-A textarea, #command-B textarea { overflow-wrap: anywhere; field-sizing: content;
  height: auto !important; max-height: none !important; }"""


def gradio_temp_dir():
    """Gradio's temporary folder (GRADIO_TEMP_DIR, else the system's); one line when it is taken by
    something that is not a folder."""
    folder = Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")
    if folder.exists() and not folder.is_dir():
        raise RegditError(f"GRADIO_TEMP_DIR={folder} is not a folder: point GRADIO_TEMP_DIR to a "
                          "folder (or unset it)")
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder)


def run_app(config: AppConfig):
    """Load the model once and serve the page until interrupted."""
    # Gradio takes seconds to import: looked for first, imported once the model has loaded
    if importlib.util.find_spec("gradio") is None:
        raise RegditError(f"regdit app needs Gradio: {INSTALL}")
    check_port(config.host, config.port)
    gradio_temp_dir()
    print(f"regdit app: loading {config.ckpt} ...", flush=True)
    explorer = Explorer(config)
    page = build_page(import_gradio(explorer.files.name), explorer)
    # api_open=False: the REST route that would run requests beside the queue is closed
    page.queue(default_concurrency_limit=1, api_open=False)
    # max_file_size=0: the page takes no upload, so Gradio's upload route stores nothing; no footer
    # (its "Use via API" page lists the page's inputs as an API)
    page.launch(server_name=config.host, server_port=config.port, share=False, quiet=True, css=CSS,
                prevent_thread_lock=True, show_error=True, run_history=False,
                enable_monitoring=False, mcp_server=False, pwa=False, ssr_mode=False,
                footer_links=[], max_file_size=0)
    print(f"regdit app: {config.ckpt} on http://{config.host}:{config.port} (Ctrl+C stops it)",
          flush=True)
    page.block_thread()

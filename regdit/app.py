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
import html
import importlib.resources
import importlib.util
import os
import shlex
import socket
import threading
from dataclasses import dataclass

import torch

from regdit import RegditError
from regdit.config import Settings, flag
from regdit.sample import (
    SampleConfig,
    Sampling,
    check_class_label,
    check_guidance,
    load_guide,
    load_model_and_vae,
    sample_batch,
    vae_geometry,
)
from regdit.samplers import SAMPLERS

INSTALL = "pip install -e '.[app]'"
FLOAT_SETTINGS = ("cfg_scale", "cls_cfg_scale", "guidance_low", "guidance_high")
# what the page calls the settings whose field is not the flag's name
FIELD_NAMES = {"seed": "--global-seed", "num_images": "images"}


def imagenet_classes():
    """ImageNet's 1000 class names in class-index order (torchvision's list)."""
    text = importlib.resources.files("regdit").joinpath("imagenet_classes.txt").read_text()
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
        class_label, seed, num_images = int(class_label), int(seed), int(num_images)
        if num_images > self.config.max_images:
            raise RegditError(f"{num_images} images: at most {self.config.max_images} per grid "
                              "(regdit app --max-images)")
        # JSON gives 2 for 2.0: the settings take floats, as the command line gives them
        sampling = {name: float(value) if name in FLOAT_SETTINGS else value
                    for name, value in sampling.items()}
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

    def describe(self):
        """One line: the checkpoint, the model, its classes and resolution, the device."""
        model, config = self.model, self.config
        resolution = model.input_size * vae_geometry(self.vae)[1]
        precision = ", bf16" if config.mixed_precision == "bf16" else ""
        return (f"`{config.ckpt}`: {model.config.label}, {model.num_classes} classes, "
                f"{resolution} px, on {self.device}{precision}")


def import_gradio():
    """Gradio, without telemetry: nothing of the app leaves this machine."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
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


def settings_column(gr, name):
    """The sampling settings of one grid, as {Sampling field: component}; labels name the flags."""
    defaults = Sampling()
    with gr.Row():  # wraps where the column is narrow
        fields = dict(
            sampler=gr.Dropdown(list(SAMPLERS), value=defaults.sampler,
                                label="sampler (--sampler)", elem_id=f"sampler-{name}"),
            num_steps=gr.Number(defaults.steps, precision=0, label="steps (--num-steps)",
                                elem_id=f"steps-{name}"),
            cfg_scale=gr.Number(defaults.cfg_scale, label="guidance scale (--cfg-scale)",
                                elem_id=f"cfg-{name}"),
            cls_cfg_scale=gr.Number(defaults.cls_cfg_scale,
                                    label="class-token guidance (--cls-cfg-scale)",
                                    elem_id=f"cls-cfg-{name}"),
            guidance_low=gr.Number(defaults.guidance_low, label="guidance from t (--guidance-low)",
                                   elem_id=f"low-{name}"),
            guidance_high=gr.Number(defaults.guidance_high,
                                    label="guidance up to t (--guidance-high)",
                                    elem_id=f"high-{name}"))
    # each sampler's own number of steps when it is picked
    fields["sampler"].change(lambda sampler: Sampling(sampler=sampler).steps, fields["sampler"],
                             fields["num_steps"])
    return fields


def results(gr, name):
    gallery = gr.Gallery(label=f"grid {name}", format="png", columns=4,
                         object_fit="contain", buttons=["download", "fullscreen"],
                         elem_id=f"grid-{name}")
    command = gr.Textbox(label=f"the same grid from the command line ({name})", lines=2,
                         interactive=False, buttons=["copy"], elem_id=f"command-{name}")
    return gallery, command


def build_page(gr, explorer):
    """The page: class, seed and number of images for both grids; sampling settings, grid and
    command per column; the second column only in comparison mode."""
    classes = [(f"{name} ({i})", i) for i, name in enumerate(explorer.classes)]
    with gr.Blocks(title="regdit app", analytics_enabled=False, delete_cache=(600, 3600)) as page:
        gr.Markdown(f"## regdit app\n{explorer.describe()}")
        with gr.Row(equal_height=True):
            class_label = gr.Dropdown(classes, value=0, label="class (--class-label)", scale=3,
                                      elem_id="class")
            seed = gr.Number(0, precision=0, label="seed (--global-seed)", elem_id="seed")
            num_images = gr.Slider(1, explorer.config.max_images,
                                   value=min(8, explorer.config.max_images), step=1,
                                   label="images", elem_id="images")
            compare = gr.Checkbox(False, label="compare with a second setting", elem_id="compare")
            button = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Row():
            with gr.Column():
                settings_a = settings_column(gr, "A")
                outputs = results(gr, "A")
            with gr.Column(visible=False) as column_b:
                settings_b = settings_column(gr, "B")
                outputs += results(gr, "B")
        compare.change(lambda on: gr.Column(visible=on), compare, column_b)
        shared = dict(class_label=class_label, seed=seed, num_images=num_images, compare=compare)
        inputs = {*shared.values(), *settings_a.values(), *settings_b.values()}

        # Gradio hands its progress tracker to the parameter whose default is one
        def generate(values, progress=gr.Progress()):  # noqa: B008
            common = {name: values[component] for name, component in shared.items()}
            grids = [{name: values[component] for name, component in grid.items()}
                     for grid in [settings_a] + [settings_b] * common.pop("compare")]
            try:
                yield from draw_grids(explorer, common, grids, progress, gr)
            except RegditError as error:
                raise gr.Error(html.escape(str(error)), print_exception=False) from None

        button.click(generate, inputs, list(outputs))
    return page


def draw_grids(explorer, common, grids, progress, gr):
    """Yields (gallery, command) of each grid as it is drawn, gr.skip() for the others; the progress
    bar counts model calls. Every grid's settings are checked before the first is drawn."""
    configs = [explorer.grid_config(common["class_label"], common["seed"], common["num_images"],
                                    **settings) for settings in grids]
    total, done = sum(model_calls(config.sampling) for config in configs), 0

    def model_called():
        nonlocal done
        done += 1
        progress((min(done, total), total), desc="sampling", unit="model calls")
    outputs = [gr.skip()] * 4
    for index, config in enumerate(configs):
        images = explorer.draw(config, model_called)
        outputs[2 * index:2 * index + 2] = [
            [(image, f"{i:06d}.png") for i, image in enumerate(images)], explorer.command(config)]
        yield list(outputs)  # a copy: the next grid changes outputs


# Small images shown large keep their pixels sharp; a grid is as tall as its images (Gradio's
# gallery keeps at least 450 px).
CSS = """#grid-A img, #grid-B img { image-rendering: pixelated; }
#grid-A .grid-wrap, #grid-B .grid-wrap { min-height: 0; max-height: none; }"""


def run_app(config: AppConfig):
    """Load the model once and serve the page until interrupted."""
    # Gradio takes seconds to import: looked for first, imported once the model has loaded
    if importlib.util.find_spec("gradio") is None:
        raise RegditError(f"regdit app needs Gradio: {INSTALL}")
    check_port(config.host, config.port)
    explorer = Explorer(config)
    page = build_page(import_gradio(), explorer)
    # api_open=False: the REST route that would run requests beside the queue is closed
    page.queue(default_concurrency_limit=1, api_open=False)
    page.launch(server_name=config.host, server_port=config.port, share=False, quiet=True, css=CSS,
                prevent_thread_lock=True, show_error=True, run_history=False,
                enable_monitoring=False, mcp_server=False, pwa=False, ssr_mode=False,
                footer_links=["api"])
    print(f"regdit app: {config.ckpt} on http://{config.host}:{config.port} (Ctrl+C stops it)",
          flush=True)
    page.block_thread()

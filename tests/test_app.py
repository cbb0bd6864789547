"""`regdit app`: its grids are `regdit sample`'s bit for bit, class names travel from the images to
checkpoints and exports, bad input is one line at start and a message in the page, and the page
works in a real browser (headless Chromium from the system's packages)."""
import argparse
import base64
import io
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_error, tiny_config
from PIL import Image

from regdit import RegditError
from regdit.commands.cli import main
from regdit.commands.export import ExportConfig, export
from regdit.commands.train import train
from regdit.core.models import SiT, SiTConfig
from regdit.core.sampling import Sampling
from regdit.extras.app import (
    PAPER_SAMPLING,
    AppConfig,
    Explorer,
    class_names,
    grid_event,
    imagenet_classes,
    model_calls,
    opening_sampling,
    sample_command,
)
from regdit.extras.demo import CLASSES, TRAIN_RECIPE
from regdit.storage.checkpoint import load_checkpoint, save_checkpoint

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# the demo's model on the latents of the demo's VAE (regdit.extras.demo.TRAIN_RECIPE,
# regdit.storage.vae.SMALL_VAE)
DEMO_MODEL = dict(input_size=8, patch_size=1, in_channels=4, hidden_size=128, depth=3, num_heads=2,
                  num_classes=len(CLASSES), z_dims=[64], projector_dim=128, encoder_depth=1)
GUIDED = dict(sampler="sde", num_steps=6, cfg_scale=2.0, cls_cfg_scale=2.0, guidance_low=0.0,
              guidance_high=0.7)


@pytest.fixture(scope="module")
def demo_sized(tmp_path_factory):
    """A checkpoint of the demo's sizes with random weights, its VAE, class names and recipe, as
    `regdit demo` writes it: what the app does with a model does not depend on what it learnt."""
    from diffusers import AutoencoderKL

    from regdit.storage.vae import SMALL_VAE, save_vae
    root = tmp_path_factory.mktemp("app")
    torch.manual_seed(0)
    save_vae(AutoencoderKL(sample_size=32, **SMALL_VAE), root / "vae")
    model = SiT(SiTConfig(**DEMO_MODEL))
    with torch.no_grad():  # no output layer left at zero: images depend on the noise
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_checkpoint(dict(ema=model.state_dict(), model_config=DEMO_MODEL, steps=1,
                         args=argparse.Namespace(path_type="linear"), classes=CLASSES,
                         config=dict(TRAIN_RECIPE, sampling_steps=0, exp_name="train"),
                         latents=dict(vae=str(root / "vae"), scale=0.18215, resolution=32)),
                    root / "demo.pt")
    return root / "demo.pt"


@pytest.fixture(scope="module")
def explorer(demo_sized):
    return Explorer(AppConfig(ckpt=str(demo_sized), device="cpu", max_images=4))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample_pngs(command, sample_dir):
    """The PNGs that the page's `regdit sample` command writes, in index order."""
    words = shlex.split(command)
    env = dict(word.split("=", 1) for word in words[:1] if "=" in word)  # CUDA_VISIBLE_DEVICES=...
    argv = [*words[len(env):], "--sample-dir", str(sample_dir)]
    assert argv[:2] == ["regdit", "sample"], command
    if env:  # another device than this process sees: run as a user would
        subprocess.run([sys.executable, "-m", "regdit", *argv[1:]], env={**os.environ, **env},
                       check=True)
    else:
        main(argv[1:])
    npz = next(Path(sample_dir).glob("*.npz"))
    return [np.array(Image.open(path)) for path in sorted(npz.with_suffix("").glob("*.png"))]


@pytest.mark.parametrize("settings", [GUIDED, dict(GUIDED, sampler="heun", cfg_scale=1.5)],
                         ids=["sde", "heun"])
def test_a_grid_is_regdit_sample_of_its_command_bit_for_bit(explorer, settings, tmp_path):
    config = explorer.grid_config(class_label=5, seed=3, num_images=3, **settings)
    calls = []
    images = explorer.draw(config, lambda: calls.append(1))
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    assert len(calls) == model_calls(config.sampling)  # the progress bar's total
    command = explorer.command(config)
    assert "--class-label 5 --global-seed 3 --num-fid-samples 3 --per-proc-batch-size 3" in command
    pngs = sample_pngs(command, tmp_path)
    assert len(pngs) == 3 and all(np.array_equal(a, b) for a, b in zip(images, pngs))
    labels = np.load(next(tmp_path.glob("*/labels.npy")))
    assert labels.tolist() == [5, 5, 5]


def test_an_autoguided_grid_is_regdit_sample_of_its_command_bit_for_bit(demo_sized, explorer,
                                                                        tmp_path):
    """`regdit app --guide-ckpt`: the guide (the demo's model with other weights) draws with the
    page's guidance scale, and the command under the grid names it."""
    checkpoint = load_checkpoint(demo_sized)
    torch.manual_seed(1)
    checkpoint["ema"] = {name: value + 0.05 * torch.randn_like(value)
                         for name, value in checkpoint["ema"].items()}
    save_checkpoint(checkpoint, tmp_path / "guide.pt")
    guided = Explorer(AppConfig(ckpt=str(demo_sized), guide_ckpt=str(tmp_path / "guide.pt"),
                                device="cpu", max_images=4))
    settings = dict(GUIDED, cls_cfg_scale=0.0)
    config = guided.grid_config(class_label=5, seed=3, num_images=3, **settings)
    images = guided.draw(config)
    command = guided.command(config)
    assert f"--guide-ckpt {tmp_path / 'guide.pt'}" in command
    pngs = sample_pngs(command, tmp_path / "sampled")
    assert all(np.array_equal(a, b) for a, b in zip(images, pngs))
    unguided = explorer.draw(explorer.grid_config(class_label=5, seed=3, num_images=3, **settings))
    assert not np.array_equal(images, unguided)  # the guide took part


def page_values(gr, **values):
    """Components as the page's, and {component: value} of a request that sets `values`."""
    shared = {name: gr.Number() for name in ("class_label", "seed", "num_images")}
    shared["compare"] = gr.Checkbox()
    settings = {side: {name: gr.Number() for name in GUIDED} for side in "AB"}
    shown = {side: gr.State() for side in "AB"}
    request = {shared[name]: values.pop(name) for name in shared}
    for side in "AB":
        request.update({settings[side][name]: values.get(f"{name}_{side}", GUIDED[name])
                        for name in GUIDED})
        request[shown[side]] = values.get(f"shown_{side}")
    return shared, settings, shown, request


@pytest.mark.slow  # importing Gradio takes seconds
def test_each_grid_is_drawn_again_only_when_its_command_changes(explorer, tmp_path):
    import gradio as gr
    with gr.Blocks():
        shared, settings, shown, request = page_values(
            gr, class_label=5, seed=1, num_images=2, compare=True, cfg_scale_B=1.0)
    progress = []
    events = {side: grid_event(gr, explorer, shared, settings, side, shown[side])
              for side in "AB"}
    drawn = {}
    for side in "AB":
        gallery, command, archive, on_show = events[side](
            request, progress=lambda *args, **kwargs: progress.append(args[0]))
        config = explorer.grid_config(5, 1, 2, **dict(GUIDED, cfg_scale=2.0 if side == "A"
                                                      else 1.0))
        assert command == on_show == explorer.command(config)
        images = explorer.draw(config)
        # downloads named like their captions; the zip holds them and the command
        assert [caption for _, caption in gallery] == [
            f"red-triangle-seed-1-{i:06d}.png" for i in range(2)]
        assert all(Path(path).name == caption and np.array_equal(np.array(Image.open(path)), image)
                   for (path, caption), image in zip(gallery, images))
        with zipfile.ZipFile(archive.value["path"]) as bundle:
            assert bundle.namelist() == [caption for _, caption in gallery] + ["command.txt"]
            assert bundle.read("command.txt").decode() == command + "\n"
        assert Path(archive.value["path"]).name == f"red-triangle-seed-1-grid-{side}.zip"
        drawn[side] = command
    # one progress bar per grid, each counting its own model calls
    steps = GUIDED["num_steps"]
    assert progress == [(done, steps) for done in range(1, steps + 1)] * 2
    # only B's guidance changed: A is kept as shown, B drawn again
    progress.clear()
    request.update({shown[side]: drawn[side] for side in "AB"})
    request[settings["B"]["cfg_scale"]] = 1.5
    assert events["A"](request, progress=lambda *a, **k: progress.append(a[0])) == [gr.skip()] * 4
    assert "--cfg-scale 1.5" in events["B"](request, progress=lambda *a, **k: None)[1]
    assert progress == []
    # without comparison B is not drawn; a bad B is refused before A is drawn
    assert events["B"]({**request, shared["compare"]: False}, progress=None) == [gr.skip()] * 4
    request[settings["B"]["num_steps"]] = 0
    request[shown["A"]] = None
    with pytest.raises(gr.Error, match="--num-steps 0: must be at least 1"):
        events["A"](request, progress=lambda *a, **k: progress.append(a[0]))
    assert progress == []
    # the values as a raw request to the queue sends them (the page's event does not preprocess)
    request[settings["B"]["num_steps"]] = 6
    request[shared["seed"]] = "abc"
    with pytest.raises(gr.Error, match=r"--global-seed 'abc': enter a number"):
        events["A"](request, progress=None)


def test_the_page_opens_on_the_sampling_the_checkpoint_was_drawn_with(explorer):
    config = SiTConfig(**DEMO_MODEL)
    demo = opening_sampling(dict(settings=dict(TRAIN_RECIPE, sampling_steps=0)), config)
    assert demo[0] == Sampling(sampler="sde", num_steps=100, cfg_scale=2.0, cls_cfg_scale=2.0)
    assert explorer.opening == demo and "the demo's sampling" in demo[1]
    assert opening_sampling(dict(official=True), config)[0] == PAPER_SAMPLING
    previews = dict(settings=dict(model="SiT-B/2", sampling_steps=5000, eval_every=10000))
    # a run of an earlier regdit recorded no --preview-*: the previews' defaults
    assert opening_sampling(previews, config)[0] == Sampling(sampler="ode", num_steps=50,
                                                             cfg_scale=4.0)
    recorded = dict(settings={**previews["settings"], "preview_sampler": "heun",
                              "preview_num_steps": 12, "preview_cfg_scale": 3.0})
    assert opening_sampling(recorded, config) == (
        Sampling(sampler="heun", num_steps=12, cfg_scale=3.0),
        "the sampling of the run's preview grids")
    no_dropout = SiTConfig(**DEMO_MODEL, class_dropout_prob=0.0)
    assert opening_sampling(previews, no_dropout)[0].cfg_scale == 1.0
    evaluations = dict(settings=dict(sampling_steps=0, eval_every=10, eval_sampler="ode",
                                     eval_num_steps=40, eval_cfg_scale=1.5))
    assert opening_sampling(evaluations, config) == (
        Sampling(sampler="ode", num_steps=40, cfg_scale=1.5),
        "the sampling of the run's evaluations")
    assert opening_sampling(dict(settings={}), config)[0] == Sampling()


@pytest.mark.parametrize("change,message", [
    (dict(num_steps=0), r"^--num-steps 0: must be at least 1 and at most 10000$"),
    (dict(cfg_scale=0.5), r"^--cfg-scale 0.5: must be at least 1$"),
    (dict(guidance_low=0.9, guidance_high=0.1), r"^--guidance-low 0.9 is above --guidance-high"),
    (dict(seed=2**32), r"^--global-seed 4294967296: must be at least 0 and below 4294967296$"),
    (dict(seed=-1), r"^--global-seed -1: must be at least 0"),
    (dict(num_images=5), r"^5 images: at most 4 per grid \(regdit app --max-images\)$"),
    (dict(num_steps=1001), r"^--num-steps 1001: at most 1000 per grid \(regdit app --max-steps\)$"),
    (dict(class_label=10), r"^--class-label 10: the model has 10 classes; pass one from 0 to 9$"),
    (dict(cfg_scale=None), r"^--cfg-scale: empty; enter a value$"),
    (dict(seed=None), r"^--global-seed: empty; enter a value$"),
    # raw requests to the queue, which the page's own boxes do not send
    (dict(seed=float("nan")), r"^--global-seed nan: must be a finite number$"),
    (dict(num_steps=2.5), r"^--num-steps 2.5: must be a whole number$"),
    (dict(cfg_scale="2"), r"^--cfg-scale '2': enter a number$"),
    (dict(num_images=[1]), r"^images \[1\]: enter a number$"),
])
def test_a_bad_value_in_the_page_is_one_line(explorer, change, message):
    values = {**dict(class_label=0, seed=0, num_images=2), **GUIDED, **change}
    with pytest.raises(RegditError, match=message):
        explorer.grid_config(**values)


def test_draws_from_several_threads_take_turns(explorer):
    """Each draw's progress counts its own model calls: draws on the shared model (and its forward
    hook) run one at a time, whoever calls them."""
    config = explorer.grid_config(class_label=1, seed=0, num_images=2, **GUIDED)
    counts = [[], []]
    threads = [threading.Thread(target=explorer.draw, args=(config, lambda c=c: c.append(1)))
               for c in counts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [len(c) for c in counts] == [model_calls(config.sampling)] * 2


def test_the_command_names_files_absolutely_and_the_gpu_as_the_user_sees_it(explorer, tmp_path,
                                                                            monkeypatch):
    config = explorer.grid_config(class_label=1, seed=2.0, num_images=2, **GUIDED)
    assert config.global_seed == 2 and "--global-seed 2 " in explorer.command(config)
    monkeypatch.chdir(Path(config.ckpt).parent)
    config.ckpt = Path(config.ckpt).name  # relative to this folder
    words = shlex.split(sample_command(config, torch.device("cpu")))
    assert words[words.index("--ckpt") + 1] == str(Path(config.ckpt).resolve())
    # GPU 1 of a process that sees GPUs 4 and 5 is GPU 5
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    assert sample_command(config, torch.device("cuda:1")).startswith(
        "CUDA_VISIBLE_DEVICES=5 regdit sample ")
    assert sample_command(config, torch.device("cuda")).startswith("CUDA_VISIBLE_DEVICES=4 ")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert sample_command(config, torch.device("cuda:2")).startswith("CUDA_VISIBLE_DEVICES=2 ")


def test_guidance_needs_a_model_trained_with_label_dropout(demo_sized, tmp_path):
    checkpoint = load_checkpoint(demo_sized)
    checkpoint["model_config"] = dict(DEMO_MODEL, class_dropout_prob=0.0)
    # without dropout there is no null-class row
    checkpoint["ema"]["y_embedder.embedding_table.weight"] = \
        checkpoint["ema"]["y_embedder.embedding_table.weight"][:-1]
    save_checkpoint(checkpoint, tmp_path / "no-dropout.pt")
    explorer = Explorer(AppConfig(ckpt=str(tmp_path / "no-dropout.pt"), device="cpu"))
    with pytest.raises(RegditError, match="trained without label dropout .*pass --cfg-scale 1"):
        explorer.grid_config(class_label=0, seed=0, num_images=2, **GUIDED)


def test_class_names():
    imagenet = imagenet_classes()
    assert len(imagenet) == len(set(imagenet)) == 1000 and all(imagenet)
    # the standard order of class indices
    assert (imagenet[0], imagenet[207], imagenet[999]) \
        == ("tench", "golden retriever", "toilet tissue")
    assert class_names(1000) == imagenet
    assert class_names(1000, ["a"] * 1000) == ["a"] * 1000  # the dataset's names come first
    assert class_names(3) == ["class 0", "class 1", "class 2"]
    # trained with more classes (--num-classes) than the data named
    assert class_names(3, ["cat", "dog"]) == ["cat", "dog", "class 2"]


def test_class_names_go_from_the_images_to_checkpoints_and_exports(tiny_data, tmp_path):
    dataset = json.loads((tiny_data / "data" / "regdit.json").read_text())
    assert dataset["classes"] == ["class0", "class1", "class2", "class3"]  # the folder names
    result = train(tiny_config(tiny_data, output_dir=str(tmp_path / "exps"), max_train_steps=1,
                               checkpointing_steps=1))
    assert load_checkpoint(result["checkpoint"])["classes"] == dataset["classes"]
    export(ExportConfig(ckpt=str(result["checkpoint"]), output=str(tmp_path / "export")))
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["classes"] == dataset["classes"]
    assert load_checkpoint(tmp_path / "export" / "model.safetensors")["classes"] \
        == dataset["classes"]
    explorer = Explorer(AppConfig(ckpt=str(tmp_path / "export" / "model.safetensors"),
                                  device="cpu"))
    assert explorer.classes == dataset["classes"]
    # names that are not a list of strings are one line naming the file
    config["classes"] = {"0": "cat"}
    (tmp_path / "export" / "config.json").write_text(json.dumps(config))
    with pytest.raises(RegditError, match=r'config.json: "classes" is \{\'0\': \'cat\'\}, not a '
                                          r"list of class names; copy it again or export again$"):
        load_checkpoint(tmp_path / "export" / "model.safetensors")


def test_refusals_at_start_are_one_line(demo_sized, tmp_path, capsys, monkeypatch):
    port = str(free_port())
    (tmp_path / "garbage.pt").write_bytes(os.urandom(4096))
    assert "garbage.pt is unreadable" in cli_error(
        capsys, ["app", "--ckpt", str(tmp_path / "garbage.pt"), "--port", port])
    assert "missing.pt does not exist" in cli_error(
        capsys, ["app", "--ckpt", str(tmp_path / "missing.pt"), "--port", port])
    with socket.create_server(("127.0.0.1", int(port))):  # a port in use
        assert cli_error(capsys, ["app", "--ckpt", str(demo_sized), "--port", port]).startswith(
            f"regdit app: error: --host 127.0.0.1 --port {port}: cannot serve there (")
    if not torch.cuda.is_available():
        assert cli_error(capsys, ["app", "--ckpt", str(demo_sized), "--device", "cuda"]) \
            == "regdit app: error: --device cuda: torch sees no GPU here; pass --device cpu"
    (tmp_path / "taken").write_text("")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "taken"))
    assert cli_error(capsys, ["app", "--ckpt", str(demo_sized), "--port", port]) == (
        f"regdit app: error: GRADIO_TEMP_DIR={tmp_path / 'taken'} is not a folder: point "
        "GRADIO_TEMP_DIR to a folder (or unset it)")
    monkeypatch.delenv("GRADIO_TEMP_DIR")
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if not installed
    assert cli_error(capsys, ["app", "--ckpt", str(demo_sized), "--port", port]) \
        == "regdit app: error: regdit app needs Gradio: pip install -e '.[app]'"


# --------------------------------------------------------------------------------- the browser


def start_chromium():
    """Headless Chromium of the system's packages through its chromedriver (nothing downloaded),
    every host but this one unresolvable. Missing: a failure where CI is set, else a skip."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium (pip install -e '.[dev]')")
    if missing:
        reason = (f"no {', '.join(missing)}: `apt-get install chromium chromium-driver` (.ci/run "
                  "installs them)")
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                     "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--window-size=1400,1000",
                     "--disable-dev-shm-usage",  # containers' /dev/shm is often 64 MB
                     "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                     f"--user-data-dir={tempfile.mkdtemp(prefix='regdit-chromium-')}"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def start_app(ckpt, port, log, **env):
    """`regdit app` in its own process (with `env` over this one's); returns it once the page
    answers."""
    app = subprocess.Popen([sys.executable, "-m", "regdit", "app", "--ckpt", str(ckpt),
                            "--port", str(port), "--device", "cpu"],
                           stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert app.poll() is None, Path(log.name).read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5):
                return app
        except OSError:
            time.sleep(0.5)
    app.kill()
    pytest.fail(f"regdit app did not answer in 180 s: {Path(log.name).read_text()[-3000:]}")


def type_into(driver, element_id, text):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    # a slider's number box, not its range
    box = driver.find_element(By.CSS_SELECTOR, f"#{element_id} input:not([type=range])")
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(text)
    return box


def shown_pngs(driver, grid):
    """The bytes of each image of a gallery, as the browser fetched them, decoded."""
    from selenium.webdriver.common.by import By
    sources = [img.get_attribute("src") for img in
               driver.find_elements(By.CSS_SELECTOR, f"#{grid} .grid-container img")]
    data = driver.execute_async_script("""
        const [sources, done] = arguments;
        Promise.all(sources.map(async source => {
            const bytes = new Uint8Array(await (await fetch(source)).arrayBuffer());
            return btoa(Array.from(bytes, b => String.fromCharCode(b)).join(""));
        })).then(done);""", sources)
    return [np.array(Image.open(io.BytesIO(base64.b64decode(item)))) for item in data]


def overflows(driver):
    """Whether the page is wider than the window (a horizontal scrollbar)."""
    return driver.execute_script(
        "return document.documentElement.scrollWidth > window.innerWidth")


@pytest.mark.slow
def test_the_page_in_a_browser_shows_what_regdit_sample_draws(demo_sized, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    driver = start_chromium()
    port = free_port()
    (tmp_path / "home").mkdir()
    with open(tmp_path / "app.log", "w") as log:
        # MPLCONFIGDIR unset: matplotlib, which Gradio imports, would keep its cache in the home
        app = start_app(demo_sized, port, log, HOME=str(tmp_path / "home"), MPLCONFIGDIR="")
    try:
        wait = WebDriverWait(driver, 120)
        driver.get(f"http://127.0.0.1:{port}/")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#generate"))
        body = driver.find_element(By.TAG_NAME, "body")
        assert "Opens on the demo's sampling" in body.text and "Use via API" not in body.text
        assert "SiT/1, depth 3, width 128" in body.text  # the report's label
        # a class by its name
        type_into(driver, "class", "red tri")
        option = "[role=option][aria-label='red triangle (5)']"
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, option))[0].click()
        type_into(driver, "seed", "7")
        # out of range: a message in the page
        type_into(driver, "cfg-A", "0.5").send_keys(Keys.TAB)
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        wait.until(lambda d: "--cfg-scale 0.5: must be at least 1" in body.text)
        # the server goes on: the first grid, on the checkpoint's own sampling
        type_into(driver, "cfg-A", "2").send_keys(Keys.TAB)
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#grid-A .grid-container img"))
                   == 8)
        command = driver.find_element(By.CSS_SELECTOR, "#command-A textarea").get_attribute(
            "value")
        assert "--class-label 5 --global-seed 7" in command
        assert "--sampler sde --num-steps 100 --cfg-scale 2.0 --cls-cfg-scale 2.0" in command
        shown = shown_pngs(driver, "grid-A")
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#zip-A").is_displayed())
        # comparison: side by side at 1400 px, one under the other on a phone; nothing sideways
        driver.find_element(By.CSS_SELECTOR, "#compare input").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#steps-B input"))
        columns = [driver.find_element(By.CSS_SELECTOR, f"#steps-{side}") for side in "AB"]
        assert columns[1].location["x"] > columns[0].location["x"] and not overflows(driver)
        driver.save_screenshot(str(tmp_path / "app-1400.png"))
        driver.set_window_size(420, 900)
        wait.until(lambda d: columns[1].location["y"] > columns[0].location["y"])
        assert not overflows(driver)
        driver.save_screenshot(str(tmp_path / "app-420.png"))
        # nothing came from elsewhere than the app
        urls = driver.execute_script(
            "return performance.getEntriesByType('resource').map(entry => entry.name)")
        assert [u for u in urls if not u.startswith((f"http://127.0.0.1:{port}/", "data:",
                                                    "blob:"))] == []
        # requests go through the queue only: Gradio's REST route beside it is closed
        post = urllib.request.Request(f"http://127.0.0.1:{port}/gradio_api/run/generate",
                                      data=b'{"data": []}', method="POST",
                                      headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(post, timeout=30)
        # the page takes no upload: Gradio's upload route refuses any byte
        upload = urllib.request.Request(
            f"http://127.0.0.1:{port}/gradio_api/upload", method="POST",
            data=b"--x\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.bin\""
                 b"\r\nContent-Type: application/octet-stream\r\n\r\n0123456789\r\n--x--\r\n",
            headers={"Content-Type": "multipart/form-data; boundary=x"})
        with pytest.raises(urllib.error.HTTPError, match="413"):
            urllib.request.urlopen(upload, timeout=30)
    finally:
        driver.save_screenshot(str(tmp_path / "app.png"))  # also of a failure
        print(f"screenshots: {tmp_path}")
        driver.quit()
        app.terminate()
        app.wait(timeout=30)
    assert list((tmp_path / "home").iterdir()) == []  # nothing written in the user's home
    drawn = sample_pngs(command, tmp_path / "samples")
    assert len(shown) == len(drawn) == 8
    assert all(np.array_equal(a, b) for a, b in zip(shown, drawn))
    # the terminal says what it loads at once, and the address once the page answers
    printed = (tmp_path / "app.log").read_text().splitlines()
    assert printed[0] == f"regdit app: loading {demo_sized} ..."
    assert f"regdit app: {demo_sized} on http://127.0.0.1:{port} (Ctrl+C stops it)" in printed

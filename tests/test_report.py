"""`regdit report`'s run page: one HTML file that loads nothing from elsewhere, with every panel
that has data (and the reason for those without), REG's published points of the run's model, the
preview grids over training, names that tell runs apart, and a layout that fits a 1400 px window
and a 420 px phone in a real browser (headless Chromium from the system's packages)."""
import json
import math
import re
import time

import numpy as np
import pytest
import yaml
from conftest import cli_error, tiny_config
from PIL import Image

from regdit.commands.cli import main
from regdit.commands.train import train
from regdit.core.models import SiTConfig, model_label
from regdit.extras.report import (
    MAX_PREVIEWS,
    NOT_LOSS_TERMS,
    plot,
    preview_grids,
    read_run,
    run_model_label,
    run_names,
    summary_rows,
    training_figures,
    training_seconds,
)


def write_run(exp_dir, exp_name="reg", evaluations=True, previews=(1000, 2000), fd_dinov2=False,
              **settings):
    """A run folder as `regdit train` leaves it: metrics.jsonl, config.yaml, samples/%07d.png."""
    lines = []
    for step in range(100, 2001, 100):
        lines.append(dict(step=step, loss_mean=0.5 + 0.1 / step, proj_loss=-0.6, loss_final=-0.1,
                          grad_norm=1.0, images_per_sec=50.0 if step > 1000 else 100.0,
                          tflops_per_process=2.0))
        if evaluations and step % 1000 == 0:
            lines.append({"step": step, "eval/fid": 40.0 - step / 100, "eval/sfid": 9.0,
                          "eval/inception_score": 5.0, "eval/precision": 0.5,
                          "eval/recall": 0.4, "eval/seconds": 60.0})
            if fd_dinov2:
                lines[-1]["eval/fd_dinov2"] = 300.0 - step / 10
    (exp_dir / "samples").mkdir(parents=True)
    (exp_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    settings = dict(exp_name=exp_name, model="SiT-B/2", method="reg", batch_size=10,
                    eval_samples=10000, **settings)
    (exp_dir / "config.yaml").write_text(yaml.safe_dump(settings))
    for step in previews:
        image = np.full((8, 8, 3), step // 10 % 256, dtype=np.uint8)
        Image.fromarray(image).save(exp_dir / "samples" / f"{step:07d}.png")
    return exp_dir


def page_of(tmp_path, *exp_dirs):
    main(["report", *map(str, exp_dirs), "--output", str(tmp_path / "report.html")])
    # Plotly's JSON writes "/" as "\u002f"
    return (tmp_path / "report.html").read_text().replace("\\u002f", "/")


def test_the_page_is_one_file_with_every_panel_and_the_papers_points(tmp_path):
    run = write_run(tmp_path / "a" / "train", exp_name="xl-run")
    page = page_of(tmp_path, run)
    # Plotly's JavaScript is inside; nothing is fetched from elsewhere
    assert "Plotly" in page and len(page) > 1_000_000
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=['\"]?(https?:)?//", page)
    for panel in ("training-loss-terms", "gradient-norm", "throughput", "model-TFLOP-s-per-process",
                  "FID", "sFID", "Inception-Score", "precision-and-recall"):
        assert f'id="panel-{panel}"' in page, panel
    # the run is named by its experiment name, not its folder
    assert "regdit report: xl-run<" in page
    # REG's published FID of SiT-B/2 (400K: 15.2), with its protocol beside the run's
    assert "SiT-B/2 + REG, paper (FID-50K, SDE 250 steps, no guidance)" in page
    assert "xl-run (FID-10000, SDE 250 steps, no guidance)" in page
    # FD_DINOv2 is folded away with the reason; the preview grids are embedded with their steps
    assert re.search(r"<li><b>FD_DINOv2</b>: the evaluations did not compute FD_DINOv2", page)
    grids = json.loads(re.search(r"<script type='application/json'>(.*?)</script>", page)[1])
    assert grids["steps"] == [1000, 2000] and len(grids["sources"]) == 2
    assert all(source.startswith("data:image/png;base64,") for source in grids["sources"])
    assert "settings of xl-run (5)" in page


def test_the_page_is_the_default_output(tmp_path, monkeypatch):
    run = write_run(tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    main(["report", str(run)])
    assert (tmp_path / "report.html").read_text().startswith("<!doctype html>")


def test_fd_dinov2_is_shown_when_the_evaluations_have_it(tmp_path):
    page = page_of(tmp_path, write_run(tmp_path / "run", fd_dinov2=True))
    assert 'id="panel-FD_DINOv2"' in page and "<b>FD_DINOv2</b>" not in page


def test_a_run_without_evaluations_or_previews_says_why_its_panels_are_empty(tmp_path):
    page = page_of(tmp_path, write_run(tmp_path / "run", evaluations=False, previews=()))
    assert 'id="panel-gradient-norm"' in page and 'id="panel-FID"' not in page
    folded = re.search(r"<summary>(\d+) panels without data</summary><ul>(.*?)</ul>", page)
    assert folded and folded[1] == "6"
    for title in ("FID", "sFID", "Inception Score", "precision and recall", "FD_DINOv2"):
        assert f"<li><b>{title}</b>: no evaluations in these runs: train with --eval-every N" \
            in folded[2]
    assert "<li><b>preview grids</b>: no preview grids in samples/: train with --sampling-steps" \
        in folded[2]


def test_runs_of_one_name_are_told_apart_by_their_folder(tmp_path):
    first, second = write_run(tmp_path / "a" / "train"), write_run(tmp_path / "b" / "train")
    third = write_run(tmp_path / "c" / "train", exp_name="other")
    runs = [read_run(path) for path in (first, second, third)]
    assert run_names(runs, [first, second, third]) == [f"reg ({first})", f"reg ({second})",
                                                        "other"]


def test_the_table_labels_its_numbers_and_takes_the_median_speed(tmp_path):
    run = read_run(write_run(tmp_path / "run"))
    rows = summary_rows([run], ["reg"])
    assert rows["total loss (loss_final, last)"] == ["-0.1000"]
    assert rows["denoising loss (loss_mean, last)"] == ["0.5000"]
    # 10 lines at 100 images/s and 10 at 50: the median, not the last
    assert rows["images/s (median)"] == ["100.0"] and rows["best FID"] == ["20.000 at step 2000"]
    # 1000 steps of 10 images at 100/s, then 1000 at 50/s
    assert training_seconds(run[2], run[1]) == pytest.approx(100 + 200)
    assert rows["training time"] == ["5 min 00 s"] and rows["evaluation time"] == ["2 min 00 s"]
    assert math.isnan(training_seconds(run[2], {}))


def test_one_model_label_for_standard_and_custom_sizes():
    assert model_label(28, 1152, 2) == "SiT-XL/2"
    assert model_label(3, 128, 1) == "SiT/1, depth 3, width 128"
    assert run_model_label(dict(model="SiT-S/1", depth=3, hidden_size=128)) \
        == "SiT/1, depth 3, width 128"
    assert run_model_label(dict(model="SiT-XL/2", depth=None)) == "SiT-XL/2"
    custom = SiTConfig(patch_size=1, depth=3, hidden_size=128, num_heads=2, encoder_depth=1)
    assert (SiTConfig().display_name, SiTConfig().label) == ("SiT-XL/2", "SiT-XL/2")
    assert (custom.display_name, custom.label) == ("SiT/1, depth 3, width 128", "SiT-custom/1")


def test_many_previews_are_evenly_spaced_with_the_last(tmp_path):
    steps = list(range(100, 100 * (3 * MAX_PREVIEWS) + 1, 100))
    grids, count = preview_grids(write_run(tmp_path / "run", previews=steps))
    kept = [step for step, _ in grids]
    assert count == len(steps) and len(kept) == MAX_PREVIEWS
    assert kept[0] == steps[0] and kept[-1] == steps[-1] and kept == sorted(set(kept))


def test_a_preview_that_is_not_a_png_is_one_line(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    (run / "samples" / "0003000.png").write_text("not an image")
    assert cli_error(capsys, ["report", str(run), "--output", str(tmp_path / "r.html")]) == (
        f"regdit report: error: {run / 'samples' / '0003000.png'} is not a PNG, not a preview "
        "grid of `regdit train`: remove it, or move it out of samples/")


# --------------------------------------------------------------------------------- the browser


@pytest.mark.slow  # a real run, then Chromium
def test_the_page_fits_a_wide_window_and_a_phone_in_a_browser(tiny_data, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from test_app import start_chromium
    result = train(tiny_config(tiny_data, output_dir=str(tmp_path / "exps"), exp_name="real",
                               max_train_steps=6, log_every=1, sampling_steps=3))
    assert result
    evaluated = write_run(tmp_path / "other" / "real")
    page = tmp_path / "report.html"
    main(["report", str(tmp_path / "exps" / "real"), str(evaluated), "--output", str(page)])
    driver = start_chromium()
    try:
        for width, height in ((1400, 1000), (420, 900)):
            driver.set_window_size(width, height)
            driver.get(page.as_uri())
            time.sleep(1)
            assert driver.execute_script(
                "return document.documentElement.scrollWidth <= window.innerWidth"), width
            # nothing came from elsewhere than the file itself
            assert driver.execute_script("return performance.getEntriesByType('resource')"
                                         ".filter(e => !/^(file|data|blob):/.test(e.name))"
                                         ".map(e => e.name)") == []
            plots = driver.find_elements(By.CSS_SELECTOR, ".panel .main-svg")
            assert len(driver.find_elements(By.CSS_SELECTOR, ".panel")) == 8 and plots
            previews = driver.find_elements(By.CSS_SELECTOR, ".preview")
            assert len(previews) == 2 and all(
                driver.execute_script("return arguments[0].naturalWidth", image) > 0
                for image in driver.find_elements(By.CSS_SELECTOR, ".preview img"))
            # the real run's grids: steps 3 and 6; the slider goes back to step 3
            real = previews[0]
            assert real.find_element(By.TAG_NAME, "output").text == "6"
            shown = real.find_element(By.TAG_NAME, "img").get_attribute("src")
            driver.execute_script("arguments[0].value = 0; arguments[0].dispatchEvent("
                                  "new Event('input'))", real.find_element(By.TAG_NAME, "input"))
            assert real.find_element(By.TAG_NAME, "output").text == "3"
            assert real.find_element(By.TAG_NAME, "img").get_attribute("src") != shown
            # a hover value: the throughput of the evaluated run (50 or 100 images/s)
            plot = driver.find_element(By.CSS_SELECTOR, "#panel-throughput .nsewdrag")
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", plot)
            ActionChains(driver).move_to_element(plot).perform()
            hover = driver.find_element(By.CSS_SELECTOR, "#panel-throughput .hoverlayer").text
            assert "(logged " in hover, hover
            # the smoothing control: at 0 the curves are the logged values, at 0.6 they are not
            logged = ("return document.getElementById('panel-throughput').data.every("
                      "trace => trace.y.every((y, i) => y === trace.customdata[i]))")
            assert not driver.execute_script(logged)
            driver.execute_script("const s = document.getElementById('smoothing'); s.value = 0; "
                                  "s.dispatchEvent(new Event('input'))")
            assert driver.execute_script(logged)
    finally:
        driver.quit()


def test_any_number_of_loss_terms_are_drawn_apart(tmp_path):
    """Nine terms (five beyond REG's four) differ in line style or marker on the page and in the
    figure for papers."""
    run = write_run(tmp_path / "terms", evaluations=False)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    extra = [f"term_{i}" for i in range(5)]
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({**line, **dict.fromkeys(extra, 0.1)}) + "\n" for line in lines))
    runs = [read_run(run)]
    terms = [term for term in lines[0] if term not in NOT_LOSS_TERMS] + extra
    import plotly.graph_objects as go
    loss = training_figures(go, runs, ["terms"], ["#1f77b4"])["training loss terms"]
    styles = [(trace.line.dash, trace.marker.symbol) for trace in loss.data]
    assert [trace.name for trace in loss.data] == terms and len(set(styles)) == len(terms)
    lines_drawn = plot(runs).axes[0].get_lines()
    assert len({(line.get_linestyle(), line.get_marker()) for line in lines_drawn}) == len(terms)

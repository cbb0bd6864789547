"""`regdit report EXP_DIR [EXP_DIR ...] --output report.html|.png`: how runs train — the loss
terms, the gradient norm, images/s, TFLOP/s, and the evaluations against iterations with the
paper's published points for the same model — several experiments overlaid.

The .html run page is one self-contained file (Plotly, its JavaScript embedded): hover, zoom,
TensorBoard's smoothing, the preview grids over training, the settings and the time spent; the .png
is a fixed matplotlib figure for papers."""
import base64
import html
import io
import itertools
import json
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from regdit import RegditError
from regdit.config import Settings, flag, read_yaml
from regdit.core.models import SiT_models, model_arguments, model_label
from regdit.files import (
    atomic_write,
    check_output,
    check_regular_file,
    check_writable,
    file_kind,
    read_head,
)

# ImageNet 256, FID-50k without guidance, against training iterations (REG paper, Table 1), per
# (model, method).
PUBLISHED_FID = {
    ("SiT-XL/2", "reg"): {200_000: 5.0, 400_000: 3.4, 1_000_000: 2.7, 2_400_000: 2.2,
                          4_000_000: 1.8},
    ("SiT-L/2", "reg"): {100_000: 11.4, 400_000: 4.6},
    ("SiT-B/2", "reg"): {400_000: 15.2},
    ("SiT-XL/2", "repa"): {200_000: 11.1, 400_000: 7.9, 1_000_000: 6.4, 4_000_000: 5.9},
}
# the other keys of a training line
NOT_LOSS_TERMS = ("step", "grad_norm", "images_per_sec", "tflops_per_process")


@dataclass
class ReportConfig(Settings):
    exp_dirs: list[str] | None = flag(
        None, "experiment folders (OUTPUT_DIR/EXP_NAME of `regdit train`)", positional=True,
        required=True, metavar="EXP_DIR")
    output: str = flag("report.html", "the run page (.html: interactive curves, evaluations, "
                                      "preview grids, settings, in one file that opens offline) "
                                      "or a figure for papers (.png)")

    def check(self):
        if Path(self.output).suffix not in (".png", ".html"):
            raise RegditError(f"--output {self.output}: must end in .png or .html")


def read_run(exp_dir):
    """(name, settings, training lines, evaluation lines) of an experiment folder. Each line needs
    its step; a value that is missing or not a finite number (NaN, Infinity) is left out of the
    figure (see `value`)."""
    exp_dir = Path(exp_dir)
    metrics = exp_dir / "metrics.jsonl"
    try:
        mode = os.stat(metrics).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise RegditError(f"{exp_dir} has no metrics.jsonl: pass the folder of a `regdit train` "
                          "run (OUTPUT_DIR/EXP_NAME) that has logged at least once") from None
    if not stat.S_ISREG(mode):  # never opened: reading a FIFO would wait for a writer forever
        raise RegditError(f"{metrics} is {file_kind(mode)}, not the file `regdit train` writes: "
                          "pass the folder of a `regdit train` run")
    try:
        lines = metrics.read_text().splitlines()
    except UnicodeDecodeError:
        raise RegditError(f"{metrics} is not text; it was not written by regdit") from None
    entries = []
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            # a last line cut short by a kill is dropped (the run drops it on resume)
            if number < len(lines):
                raise RegditError(f"{metrics}: line {number} is not JSON; it was not written by "
                                  "regdit") from None
            continue
        if not isinstance(entry, dict) or math.isnan(value(entry, "step")):
            raise RegditError(f"{metrics}: line {number} has no step; it was not written by regdit")
        entries.append(entry)
    settings_path = exp_dir / "config.yaml"
    settings = {}
    if settings_path.is_file():
        settings = read_yaml(settings_path, "run settings") or {}
        if not isinstance(settings, dict):
            raise RegditError(f"{settings_path} is not the settings file `regdit train` writes "
                              "(a YAML mapping): restore it, or move it away")
    name = settings.get("exp_name")
    return (name if isinstance(name, str) and name else exp_dir.name, settings,
            [e for e in entries if "loss_final" in e],
            [e for e in entries if "eval/fid" in e])


def value(entry, key):
    """`entry[key]` as a float; NaN when it is missing or not a finite number."""
    number = entry.get(key)
    finite = (isinstance(number, int | float) and not isinstance(number, bool)
              and math.isfinite(number))
    return float(number) if finite else math.nan


def series(entries, key):
    """(steps, values) of `key` in `entries`, leaving out the points where it is missing or not
    finite."""
    points = [(value(entry, "step"), value(entry, key)) for entry in entries]
    points = [point for point in points if math.isfinite(point[1])]
    return [step for step, _ in points], [number for _, number in points]


def plot(runs, names=None):
    """The report figure (matplotlib, for papers) of runs as read_run returns them, named by
    `names` (default: theirs)."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 3, figsize=(16, 9), dpi=100)
    (loss_axes, grad_axes, speed_axes), (flops_axes, fid_axes, is_axes) = axes
    panels = [(grad_axes, "grad_norm", "gradient norm"), (speed_axes, "images_per_sec", "images/s"),
              (flops_axes, "tflops_per_process", "model TFLOP/s per process")]
    published = set()
    names = names or [name for name, *_ in runs]
    for run_index, ((_, settings, lines, evaluations), name) in enumerate(zip(runs, names)):
        colour = f"C{run_index}"
        # the loss terms this run logged
        terms = dict.fromkeys(key for line in lines for key in line if key not in NOT_LOSS_TERMS)
        # a line style, then markers as well: the terms stay apart however many a run logs
        styles = itertools.cycle(itertools.product((None, "o", "s", "^", "x", "D"),
                                                   ("-", "--", ":", "-.")))
        for term, (marker, style) in zip(terms, styles):
            loss_axes.plot(*series(lines, term), style, marker=marker, markevery=0.1,
                           color=colour, label=f"{name}: {term}" if len(runs) > 1 else term)
        for panel_axes, key, _ in panels:
            panel_axes.plot(*series(lines, key), color=colour, label=name)
        if evaluations:
            fid_axes.plot(*series(evaluations, "eval/fid"), "o-", color=colour,
                          label=f"{name} (FID-{settings.get('eval_samples', '?')})")
            is_axes.plot(*series(evaluations, "eval/inception_score"), "o-", color=colour,
                         label=name)
        for method in ("reg", "repa"):
            model = run_model_label(settings)
            if (model, method) in PUBLISHED_FID and (model, method) not in published:
                points = PUBLISHED_FID[model, method]
                marker, size = ("*", 10) if method == "reg" else ("s", 6)
                fid_axes.plot(list(points), list(points.values()), marker, markersize=size,
                              color="0.4", linestyle="none",
                              label=f"{model} + {method.upper()}, paper (FID-50k)")
                published.add((model, method))
    loss_axes.set(title="training loss terms", xlabel="iteration", ylabel="loss")
    for panel_axes, _, title in panels:
        panel_axes.set(title=title, xlabel="iteration")
    fid_axes.set(title="FID (no guidance unless set)", xlabel="iteration (log)", ylabel="FID",
                 xscale="log")
    is_axes.set(title="Inception Score", xlabel="iteration (log)", xscale="log")
    if not any(evaluations for *_, evaluations in runs):
        for panel_axes in (fid_axes, is_axes):
            panel_axes.text(0.5, 0.5, "no evaluations: train with --eval-every",
                            transform=panel_axes.transAxes, ha="center", va="center", color="0.3")
    for panel_axes in axes.flat:
        panel_axes.grid(alpha=0.3)
        if panel_axes.get_legend_handles_labels()[0]:
            panel_axes.legend(fontsize=7)
    figure.suptitle("regdit report: " + ", ".join(names))
    figure.tight_layout()
    return figure


PAGE_START = "<!doctype html><html><head><meta charset='utf-8'><title>regdit report</title>"
# TensorBoard's default smoothing: an exponential moving average, debiased at the start
SMOOTHING = 0.6
# the preview grids embedded per run, evenly spaced, the last among them: each is a full PNG
MAX_PREVIEWS = 30
# the protocol of the published points (REG paper, Table 1)
PAPER_PROTOCOL = "FID-50K, SDE 250 steps, no guidance"
# (title, metrics.jsonl key, y axis title) of the panels of training lines, smoothed
TRAINING_PANELS = (("gradient norm", "grad_norm", "norm"),
                   ("throughput", "images_per_sec", "images/s"),
                   ("model TFLOP/s per process", "tflops_per_process", "TFLOP/s"))
# (title, [(key, trace suffix)]) of the panels of evaluations, against log iterations
EVAL_PANELS = (("FID", [("eval/fid", "")]), ("sFID", [("eval/sfid", "")]),
               ("Inception Score", [("eval/inception_score", "")]),
               ("precision and recall", [("eval/precision", " precision"),
                                         ("eval/recall", " recall")]),
               ("FD_DINOv2", [("eval/fd_dinov2", "")]))
PLOT_CONFIG = {"responsive": True, "displaylogo": False, "scrollZoom": False,
               "toImageButtonOptions": {"format": "png", "scale": 2}}


def run_model_label(settings):
    """model_label of a run's settings (its --model with --depth and --hidden-size over it)."""
    name = settings.get("model")
    if name not in SiT_models:
        return str(name or "?")
    arguments = model_arguments(name)
    return model_label(settings.get("depth") or arguments["depth"],
                       settings.get("hidden_size") or arguments["hidden_size"],
                       arguments["patch_size"])


def run_names(runs, exp_dirs):
    """Each run by its experiment name, with its folder where two runs share a name."""
    names = [name for name, *_ in runs]
    return [f"{name} ({exp_dir})" if names.count(name) > 1 else name
            for name, exp_dir in zip(names, exp_dirs)]


def sampling_words(settings, prefix):
    """How a run samples (`eval_` settings): `SDE 250 steps, no guidance`."""
    sampler = settings.get(f"{prefix}sampler", "sde")
    steps = settings.get(f"{prefix}num_steps") or (250 if sampler == "sde" else 50)
    cfg = settings.get(f"{prefix}cfg_scale", 1.0)
    guidance = "no guidance" if cfg == 1 else f"guidance {cfg}"
    return f"{str(sampler).upper()} {steps} steps, {guidance}"


def preview_grids(exp_dir):
    """[(step, PNG bytes)] of the run's preview grids (samples/%07d.png), at most MAX_PREVIEWS
    evenly spaced with the last; and how many there are."""
    found = sorted((int(path.stem), path) for path in (Path(exp_dir) / "samples").glob("*.png")
                   if path.stem.isdigit())
    count = len(found)
    if count > MAX_PREVIEWS:
        found = [found[round(i * (count - 1) / (MAX_PREVIEWS - 1))] for i in range(MAX_PREVIEWS)]
    grids = []
    for step, path in found:
        check_regular_file(path)
        data = path.read_bytes()
        if not data.startswith(b"\x89PNG\r\n\x1a\n"):
            raise RegditError(f"{path} is not a PNG, not a preview grid of `regdit train`: remove "
                              "it, or move it out of samples/")
        grids.append((step, data))
    return grids, count


def training_seconds(lines, settings):
    """Seconds spent on training steps, from images/s and the batch size (previews, checkpoints and
    evaluations are not counted in images/s); NaN when the run did not log them."""
    batch, seconds, previous = settings.get("batch_size"), 0.0, 0.0
    if not isinstance(batch, int):
        return math.nan
    for line in lines:
        step, speed = value(line, "step"), value(line, "images_per_sec")
        seconds += (step - previous) * batch / speed if speed > 0 else math.nan
        previous = step
    return seconds


def duration(seconds):
    if not math.isfinite(seconds):
        return "-"
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


def summary_rows(runs, names):
    """The table of the runs (one column each): what was trained, how far, how fast, how good."""
    rows = {"run": names, "model": [], "method": [], "steps": [], "training time": [],
            "evaluation time": [], "total loss (loss_final, last)": [],
            "denoising loss (loss_mean, last)": [], "images/s (median)": [], "best FID": []}
    for _, settings, lines, evaluations in runs:
        last = lines[-1] if lines else {}
        speeds = sorted(series(lines, "images_per_sec")[1])
        finite = [entry for entry in evaluations if math.isfinite(value(entry, "eval/fid"))]
        best = min(finite, key=lambda entry: value(entry, "eval/fid"), default=None)
        rows["model"].append(run_model_label(settings))
        rows["method"].append(settings.get("method", "?"))
        rows["steps"].append(f"{int(value(last, 'step'))}" if last else "-")
        rows["training time"].append(duration(training_seconds(lines, settings)))
        rows["evaluation time"].append(duration(sum(
            value(entry, "eval/seconds") for entry in evaluations)) if evaluations else "-")
        for key, row in (("loss_final", "total loss (loss_final, last)"),
                         ("loss_mean", "denoising loss (loss_mean, last)")):
            rows[row].append(f"{value(last, key):.4f}" if math.isfinite(value(last, key)) else "-")
        rows["images/s (median)"].append(f"{speeds[len(speeds) // 2]:.1f}" if speeds else "-")
        rows["best FID"].append(f"{value(best, 'eval/fid'):.3f} at step {best['step']}" if best
                                else "-")
    return rows


def summary_table(runs, names):
    body = "".join(f"<tr><th>{html.escape(row)}</th>"
                   + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in cells) + "</tr>"
                   for row, cells in summary_rows(runs, names).items())
    return (f"<table class='summary'>{body}</table><p class='note'>loss_final sums the weighted "
            "terms; REPA's term is a negative cosine similarity, so it may be below zero. Times "
            "are summed from the logged images/s and eval/seconds.</p>")


def panel_layout(title, y_title, log_x=False):
    return dict(title=dict(text=title, x=0.02), template="plotly_white",
                margin=dict(l=56, r=12, t=40, b=40), hovermode="x unified",
                xaxis=dict(title="iteration" + (" (log)" if log_x else ""),
                           type="log" if log_x else "linear"),
                yaxis=dict(title=y_title),
                legend=dict(orientation="h", yanchor="top", y=-0.24, x=0))


def smoothed_trace(go, steps, values, name, colour, dash="solid", symbol=None):
    """A training curve (with markers of `symbol`, if any); the page smooths its y, keeping the
    logged values in customdata (shown on hover)."""
    return go.Scatter(x=steps, y=values, customdata=values, name=name,
                      mode="lines+markers" if symbol else "lines",
                      line=dict(color=colour, dash=dash, width=1.6),
                      marker=dict(symbol=symbol, size=6, maxdisplayed=12) if symbol else None,
                      hovertemplate="%{y:.4~g} (logged %{customdata:.4~g})")


def training_figures(go, runs, names, colours):
    """{title: figure} of the loss terms and TRAINING_PANELS, runs overlaid."""
    loss = go.Figure(layout=panel_layout("training loss terms", "loss"))
    figures = {"training loss terms": loss}
    for title, _, y_title in TRAINING_PANELS:
        figures[title] = go.Figure(layout=panel_layout(title, y_title))
    # a dash, then marker symbols as well: the terms stay apart however many a run logs
    styles = list(itertools.product((None, "circle", "square", "diamond", "x", "triangle-up"),
                                    ("solid", "dash", "dot", "dashdot", "longdash")))
    for (_, _, lines, _), name, colour in zip(runs, names, colours):
        terms = dict.fromkeys(key for line in lines for key in line if key not in NOT_LOSS_TERMS)
        for term, (symbol, dash) in zip(terms, itertools.cycle(styles)):
            loss.add_trace(smoothed_trace(go, *series(lines, term), f"{name}: {term}"
                                          if len(runs) > 1 else term, colour, dash, symbol))
        for title, key, _ in TRAINING_PANELS:
            figures[title].add_trace(smoothed_trace(go, *series(lines, key), name, colour))
    return figures


def eval_figures(go, runs, names, colours):
    """{title: figure} of EVAL_PANELS, with REG's published FID of the runs' model and method."""
    figures = {}
    for title, keys in EVAL_PANELS:
        figure = go.Figure(layout=panel_layout(title, title, log_x=True))
        for (_, settings, _, evaluations), name, colour in zip(runs, names, colours):
            protocol = (f"FID-{settings.get('eval_samples', '?')}, "
                        f"{sampling_words(settings, 'eval_')}")
            for (key, suffix), dash in zip(keys, ("solid", "dash")):
                steps, values = series(evaluations, key)
                if steps:
                    figure.add_trace(go.Scatter(
                        x=steps, y=values, mode="lines+markers", line=dict(color=colour, dash=dash),
                        name=f"{name}{suffix} ({protocol})" if title == "FID" else name + suffix))
        figures[title] = figure
    fid, shown = figures["FID"], set()
    if fid.data:
        for _, settings, *_ in runs:
            key = (run_model_label(settings), settings.get("method"))
            if key in PUBLISHED_FID and key not in shown:
                shown.add(key)
                fid.add_trace(go.Scatter(
                    x=list(PUBLISHED_FID[key]), y=list(PUBLISHED_FID[key].values()),
                    mode="markers", marker=dict(symbol="star", size=11, color="#555"),
                    name=f"{key[0]} + {key[1].upper()}, paper ({PAPER_PROTOCOL})"))
    return figures


def empty_reason(title, runs):
    """Why a panel has no data, in words that say what to do."""
    if title in dict(EVAL_PANELS) and not any(evaluations for *_, evaluations in runs):
        return "no evaluations in these runs: train with --eval-every N"
    if title == "FD_DINOv2":
        return "the evaluations did not compute FD_DINOv2 (no eval/fd_dinov2 values)"
    if not any(lines for _, _, lines, _ in runs):
        return "no training lines logged yet (one every --log-every steps)"
    return "not logged by these runs (values missing or not finite)"


def preview_section(names, previews):
    """Per run, its preview grids with a step slider (the last shown first)."""
    parts = []
    for index, (name, (grids, count)) in enumerate(zip(names, previews)):
        if not grids:
            continue
        sources = [f"data:image/png;base64,{base64.b64encode(data).decode()}" for _, data in grids]
        steps = [step for step, _ in grids]
        shown = f"{len(grids)} of {count}, evenly spaced" if count > len(grids) else f"{count}"
        parts.append(
            f"<figure class='preview' id='preview-{index}'>"
            f"<figcaption>{html.escape(name)}: preview grids ({shown}); step "
            f"<output>{steps[-1]}</output></figcaption>"
            f"<input type='range' min='0' max='{len(grids) - 1}' value='{len(grids) - 1}' "
            f"aria-label='preview step of {html.escape(name)}'>"
            f"<img alt='preview grid of {html.escape(name)}'>"
            f"<script type='application/json'>{json.dumps(dict(sources=sources, steps=steps))}"
            "</script></figure>")
    return "".join(parts)


def settings_section(runs, names):
    parts = []
    for (_, settings, _, _), name in zip(runs, names):
        rows = "".join(f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(str(item))}</td>"
                       "</tr>" for key, item in settings.items())
        parts.append(f"<details class='settings'><summary>settings of {html.escape(name)} "
                     f"({len(settings)})</summary><table>{rows or '<tr><td>no config.yaml'}"
                     "</table></details>")
    return "".join(parts)


# Panels share the width: three columns at 1400 px, one on a phone; nothing is wider than the page.
PAGE_CSS = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 0 auto; padding: 12px; max-width: 1800px;
       color: #222; }
h1 { font-size: 1.3em; margin: 0.2em 0 0.6em; overflow-wrap: anywhere; }
h2 { font-size: 1.1em; }
table { border-collapse: collapse; max-width: 100%; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top;
         overflow-wrap: anywhere; }
.summary th { background: #f4f4f4; }
.note { color: #555; font-size: 0.9em; }
.panels { display: grid; gap: 12px;
          grid-template-columns: repeat(auto-fill, minmax(min(100%, 420px), 1fr)); }
.panel, .preview { border: 1px solid #ddd; border-radius: 6px; padding: 4px; min-width: 0; }
.preview { margin: 0; display: flex; flex-direction: column; gap: 6px; }
.preview img { width: 100%; max-width: 512px; image-rendering: pixelated; align-self: center; }
.preview input { width: 100%; }
details { margin: 8px 0; }
.smoothing { display: flex; gap: 8px; align-items: center; flex-wrap: wrap; }
"""
# TensorBoard's smoothing on the training curves; a preview slider shows the grid of its step
PAGE_SCRIPT = """
function smooth(values, weight) {
  let last = 0, debias = 0;
  return values.map(v => { last = last * weight + (1 - weight) * v;
                           debias = debias * weight + (1 - weight); return last / debias; });
}
function smoothAll() {
  const weight = Number(document.getElementById('smoothing').value);
  document.getElementById('smoothing-value').textContent = weight.toFixed(2);
  document.querySelectorAll('.panel.smoothed .plotly-graph-div').forEach(plot => {
    const y = plot.data.map(trace => smooth(trace.customdata, weight));
    if (y.length) Plotly.restyle(plot, {y: y});
  });
}
document.getElementById('smoothing').addEventListener('input', smoothAll);
smoothAll();
document.querySelectorAll('.preview').forEach(figure => {
  const grids = JSON.parse(figure.querySelector('script').textContent);
  const slider = figure.querySelector('input');
  const show = () => {
    figure.querySelector('img').src = grids.sources[slider.value];
    figure.querySelector('output').textContent = grids.steps[slider.value];
  };
  slider.addEventListener('input', show);
  show();
});
"""


def html_page(runs, names, previews):
    """The run page: one self-contained HTML file (Plotly's JavaScript inside, nothing loaded from
    elsewhere) with the table of the runs, the smoothed training curves, the evaluations against
    REG's published points, the preview grids over training and the settings; panels without data
    are listed, folded, with the reason."""
    import plotly.graph_objects as go
    import plotly.io
    import plotly.offline

    colours = [f"hsl({(index * 137) % 360}, 65%, 42%)" for index in range(len(runs))]
    figures = {"smoothed": training_figures(go, runs, names, colours),
               "evaluated": eval_figures(go, runs, names, colours)}
    panels, empty = [], []
    for kind, group in figures.items():
        for title, figure in group.items():
            if not figure.data:
                empty.append((title, empty_reason(title, runs)))
                continue
            # room for a legend line per trace below the plot
            height = 300 + 18 * len(figure.data)
            figure.update_layout(height=height)
            panels.append(f"<div class='panel {kind}'>" + plotly.io.to_html(
                figure, full_html=False, include_plotlyjs=False, config=PLOT_CONFIG,
                default_height=f"{height}px", default_width="100%",
                div_id="panel-" + re.sub("[^A-Za-z0-9_]+", "-", title)) + "</div>")
    grids = preview_section(names, previews)
    if not grids:
        empty.append(("preview grids", "no preview grids in samples/: train with --sampling-steps "
                                        "N"))
    folded = "".join(f"<li><b>{html.escape(title)}</b>: {html.escape(reason)}</li>"
                     for title, reason in empty)
    title = "regdit report: " + ", ".join(names)
    return (f"{PAGE_START}<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<style>{PAGE_CSS}</style>"
            f"<script>{plotly.offline.get_plotlyjs()}</script></head><body>"
            f"<h1>{html.escape(title)}</h1>{summary_table(runs, names)}"
            "<p class='smoothing'><label for='smoothing'>smoothing of the training curves</label>"
            f"<input type='range' id='smoothing' min='0' max='0.99' step='0.01' "
            f"value='{SMOOTHING}'><output id='smoothing-value'>{SMOOTHING}</output></p>"
            f"<div class='panels'>{''.join(panels)}</div>"
            + (f"<h2>Preview grids over training</h2><div class='panels'>{grids}</div>"
               if grids else "")
            + (f"<details class='empty'><summary>{len(empty)} panels without data</summary>"
               f"<ul>{folded}</ul></details>" if empty else "")
            + f"{settings_section(runs, names)}<script>{PAGE_SCRIPT}</script></body></html>\n")


def foreign_to_report(path):
    """None for a figure or page that `regdit report` wrote (a matplotlib PNG, the report page),
    else what it is."""
    head = read_head(path, 128)
    matplotlib_png = head.startswith(b"\x89PNG\r\n\x1a\n") and b"Software\x00Matplotlib" in head
    if path.suffix == ".png" and not matplotlib_png:
        return "it is not a figure of `regdit report` (a PNG written by matplotlib)"
    if path.suffix == ".html" and not head.startswith(PAGE_START.encode()):
        return "it is not a page of `regdit report`"
    return None


def report(config: ReportConfig):
    """Write the figure (or the page) of the runs; returns its path."""
    output = Path(config.output)
    check_writable(output.parent, "--output")
    check_output(output, "--output", foreign_to_report)
    runs = [read_run(exp_dir) for exp_dir in config.exp_dirs]
    names = run_names(runs, config.exp_dirs)
    if output.suffix == ".png":
        import matplotlib.pyplot as plt
        figure = plot(runs, names)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        plt.close(figure)
        content = buffer.getvalue()
    else:
        content = html_page(runs, names, [preview_grids(d) for d in config.exp_dirs]).encode()
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(output) as f:
        f.write(content)
    print(f"wrote {output}")
    return output

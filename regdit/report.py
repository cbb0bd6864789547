"""`regdit report EXP_DIR [EXP_DIR ...] --output report.png|.html`: one figure of how runs train —
the loss terms, the gradient norm, images/s, TFLOP/s, and FID / IS against iterations with the
paper's published points for the same model — several experiments overlaid."""
import base64
import io
import itertools
import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from regdit import RegditError
from regdit.config import Settings, flag, read_yaml
from regdit.files import atomic_write, check_output, check_writable, file_kind, read_head

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
    output: str = flag("report.png", "the figure (.png) or a page with the figure and a table of "
                                     "each run (.html)")

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
    return (exp_dir.name, settings, [e for e in entries if "loss_final" in e],
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


def plot(runs):
    """The report figure (matplotlib) of runs as read_run returns them."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 3, figsize=(16, 9), dpi=100)
    (loss_axes, grad_axes, speed_axes), (flops_axes, fid_axes, is_axes) = axes
    panels = [(grad_axes, "grad_norm", "gradient norm"), (speed_axes, "images_per_sec", "images/s"),
              (flops_axes, "tflops_per_process", "model TFLOP/s per process")]
    published = set()
    for run_index, (name, settings, lines, evaluations) in enumerate(runs):
        colour = f"C{run_index}"
        # the loss terms this run logged
        terms = dict.fromkeys(key for line in lines for key in line if key not in NOT_LOSS_TERMS)
        for term, style in zip(terms, itertools.cycle(("-", "--", ":", "-."))):
            loss_axes.plot(*series(lines, term), style, color=colour,
                           label=f"{name}: {term}" if len(runs) > 1 else term)
        for panel_axes, key, _ in panels:
            panel_axes.plot(*series(lines, key), color=colour, label=name)
        if evaluations:
            fid_axes.plot(*series(evaluations, "eval/fid"), "o-", color=colour,
                          label=f"{name} (FID-{settings.get('eval_samples', '?')})")
            is_axes.plot(*series(evaluations, "eval/inception_score"), "o-", color=colour,
                         label=name)
        for method in ("reg", "repa"):
            model = settings.get("model")
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
        fid_axes.text(0.5, 0.5, "no evaluations: train with --eval-every",
                      transform=fid_axes.transAxes, ha="center", va="center", color="0.3")
    for panel_axes in axes.flat:
        panel_axes.grid(alpha=0.3)
        if panel_axes.get_legend_handles_labels()[0]:
            panel_axes.legend(fontsize=7)
    figure.suptitle("regdit report: " + ", ".join(name for name, *_ in runs))
    figure.tight_layout()
    return figure


def html_page(runs, png):
    """A page with the figure and one table row per run: last logged step, loss, images/s, best
    FID and the FD_DINOv2 of its evaluation."""
    rows = []
    for name, settings, lines, evaluations in runs:
        last = lines[-1] if lines else {}
        finite = [entry for entry in evaluations if math.isfinite(value(entry, "eval/fid"))]
        best = min(finite, key=lambda entry: value(entry, "eval/fid"), default=None)
        cells = [name, settings.get("model", "?"), settings.get("method", "?"),
                 last.get("step", ""), f"{value(last, 'loss_final'):.4f}" if last else "",
                 f"{value(last, 'images_per_sec'):.1f}" if last else "",
                 f"{best['eval/fid']:.3f} at {best['step']}" if best else "-",
                 # with --eval-fd-dinov2
                 f"{best['eval/fd_dinov2']:.2f}" if best and "eval/fd_dinov2" in best else "-"]
        rows.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    columns = ("run", "model", "method", "step", "loss", "images/s", "best FID",
               "FD_DINOv2 there")
    header = "".join(f"<th>{h}</th>" for h in columns)
    return (f"{PAGE_START}</head><body>"
            f"<table border='1' cellpadding='4'><tr>{header}</tr>{''.join(rows)}</table>"
            f"<img src='data:image/png;base64,{base64.b64encode(png).decode()}' "
            "alt='regdit report'></body></html>\n")


PAGE_START = "<!doctype html><html><head><meta charset='utf-8'><title>regdit report</title>"


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
    import matplotlib.pyplot as plt

    output = Path(config.output)
    check_writable(output.parent, "--output")
    check_output(output, "--output", foreign_to_report)
    runs = [read_run(exp_dir) for exp_dir in config.exp_dirs]
    figure = plot(runs)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(output) as f:
        f.write(buffer.getvalue() if output.suffix == ".png"
                else html_page(runs, buffer.getvalue()).encode())
    print(f"wrote {output}")
    return output

"""The `regdit` command line: one subcommand per pipeline stage.

Each command is a config dataclass and a function that takes it (`train(TrainConfig)`); the flags
are the dataclass fields (`regdit.config`). Modules are imported only when their command runs (or
`--help` is asked for), so `regdit --help` stays fast.
"""
import argparse
import difflib
import importlib
import os
import shlex
import sys
import tempfile
import traceback

from regdit import EXIT_STOPPED, RegditError, Stopped, __version__
from regdit.config import (
    add_dataclass_arguments,
    config_from_args,
    missing_required,
    preset_and_yaml_defaults,
)
from regdit.files import describe_os_error
from regdit.run.plugins import load_plugins, plugin_names
from regdit.run.preemption import IN_SETUP, StopSignals, join_process_group
from regdit.run.runlock import stop_with_launcher

COMMANDS = {  # name -> (module, config class, function, one-line help)
    "prepare images": ("regdit.commands.prepare", "PrepareImagesConfig", "prepare_images",
                       "raw image folder/zip -> square RGB PNGs + dataset.json labels"),
    "prepare latents": ("regdit.commands.prepare", "PrepareLatentsConfig", "prepare_latents",
                        "images -> VAE posterior moments (batched, multi-GPU, resumable)"),
    "prepare vae": ("regdit.commands.prepare", "PrepareVaeConfig", "prepare_vae",
                    "fit a small VAE to prepared images, for data no pretrained VAE covers"),
    "train": ("regdit.commands.train", "TrainConfig", "train",
              "train a SiT/REPA/REG model with accelerate"),
    "sample": ("regdit.commands.sample", "SampleConfig", "sample",
               "generate class-conditional samples to PNGs and an ADM .npz"),
    "eval": ("regdit.commands.evaluate", "EvalConfig", "run_eval",
             "IS / FID / sFID / precision / recall of a sample .npz (ADM evaluator)"),
    "export": ("regdit.commands.export", "ExportConfig", "export",
               "export a checkpoint's EMA weights to safetensors + config JSON + model card "
               "(--push-to-hub)"),
    "report": ("regdit.extras.report", "ReportConfig", "report",
               "the run page of one or more runs (one HTML file: curves, evaluations against the "
               "paper's points, previews, settings), or a PNG figure"),
    "demo": ("regdit.extras.demo", "DemoConfig", "run_demo",
             "the whole pipeline on a tiny built-in dataset, on CPU, in minutes"),
    "app": ("regdit.extras.app", "AppConfig", "run_app",
            "look at a model in the browser: classes, samplers and guidance side by side (Gradio)"),
}
GROUPS = {"prepare": "prepare images (crop, labels), VAE latents for training, or a small VAE"}
# commands whose rerun continues
RESUMABLE_COMMANDS = ("prepare images", "prepare latents", "train", "sample", "demo")
# commands that a signal stops with one line and EXIT_STOPPED, also in set-up
# (regdit.run.preemption), and what a stop in set-up leaves; the others end on SIGTERM and are
# interrupted by Ctrl-C
STOPPABLE_COMMANDS = {
    "prepare latents": IN_SETUP, "train": IN_SETUP, "sample": IN_SETUP,
    "eval": "; nothing was saved",
    "export": "; the export may be incomplete: run the same command again",
    "demo": "; its finished stages are kept: run the same command to continue"}


class Parser(argparse.ArgumentParser):
    """One-line errors: a subcommand's usage runs to dozens of lines, and `--help` shows it
    anyway."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    # no "(default: None)" on required flags or twice on explained defaults
    def _get_help_string(self, action):
        if action.required or action.default is None or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def command_of(argv):
    """The command named in argv ("train", "prepare latents"), "" if none."""
    words = [a for a in argv if not a.startswith("-")][:2]
    candidates = (" ".join(words), words[0] if words else "")
    return next((name for name in candidates if name in COMMANDS), "")


def build_parser(command):
    """The parser of all commands; only `command`'s module is imported and its flags added
    (`.command_parser`)."""
    parser = Parser(prog="regdit", description=__doc__.splitlines()[0], allow_abbrev=False)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups = {name: subparsers.add_parser(name, help=help, description=help, allow_abbrev=False)
                    .add_subparsers(dest="subcommand", required=True, metavar="COMMAND")
              for name, help in GROUPS.items()}
    for name, (module_name, config_name, _, help_text) in COMMANDS.items():
        group, _, sub_name = name.rpartition(" ")
        sub = (groups[group] if group else subparsers).add_parser(
            sub_name, help=help_text, description=help_text, allow_abbrev=False,
            formatter_class=HelpFormatter)
        if name == command:
            add_dataclass_arguments(sub, getattr(importlib.import_module(module_name), config_name))
            parser.command_parser = sub
    return parser


def _parse(parser, argv):
    """parse_args, with unknown flags reported by the subcommand and the closest valid names
    suggested."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        options = [o for action in parser.command_parser._actions for o in action.option_strings
                   if o != "--help"]
        hints = [f"{u} (did you mean {', '.join(close)}?)"
                 if (close := difflib.get_close_matches(u, options, 2, 0.7)) else u
                 for u in unknown]
        parser.command_parser.error(f"unrecognized arguments: {' '.join(hints)}")
    return args


def parse_config(argv):
    """(command, its module, its config): flags over `--config FILE.yaml` over `--preset` over the
    defaults."""
    command = command_of(argv)
    parser = build_parser(command)
    args = _parse(parser, argv)  # without a valid command this prints the usage and exits
    module_name, config_name, _, _ = COMMANDS[command]
    module = importlib.import_module(module_name)
    config_class = getattr(module, config_name)
    defaults = preset_and_yaml_defaults(args, config_class, parser.command_parser, command)
    if defaults:
        parser.command_parser.set_defaults(**defaults)
        args = _parse(parser, argv)
    config = config_from_args(args, config_class)
    missing = missing_required(config)
    if missing:
        parser.command_parser.error(f"the following arguments are required: {', '.join(missing)}")
    return command, module, config


def internal_error(command, argv, error):
    """The line for an exception regdit did not expect (a bug, not the user's mistake): its
    traceback goes to a new file in the temp folder, one per process, made by mkstemp (a fresh name,
    opened with O_EXCL: no file or link planted there is followed), named in the line."""
    fd, log = tempfile.mkstemp(prefix="regdit-", suffix=".log", text=True)
    with os.fdopen(fd, "w") as f:
        f.write(f"regdit {__version__}, python {sys.version.split()[0]}: "
                f"regdit {shlex.join(argv)}\n")
        traceback.print_exception(error, file=f)
    first_line = next((line.strip() for line in str(error).splitlines() if line.strip()), "")[:300]
    summary = f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__
    return (f"regdit {command}: internal error: {summary}; full traceback in {log} "
            "(REGDIT_DEBUG=1 prints it instead)")


def main(argv=None):
    # a worker of a killed torchrun / accelerate launch ends instead of writing on
    stop_with_launcher()
    argv = sys.argv[1:] if argv is None else argv
    command = command_of(argv)
    if command not in STOPPABLE_COMMANDS:
        return run_command(command, argv)
    # before anything loads (importing torch alone takes seconds): a signal in set-up ends the
    # command with one line
    with StopSignals() as signals:
        signals.setup_stop = STOPPABLE_COMMANDS[command]
        try:
            return run_command(command, argv)
        finally:
            if signals.received is not None:  # the process ends: no 143, no atexit traceback
                signals.ignore_from_now()


def run_command(command, argv):
    """Run `regdit ARGV`; every way it can end is one line and an exit status."""
    try:
        if "TORCHELASTIC_RESTART_COUNT" in os.environ:  # a torchrun worker, maybe of a restart
            join_process_group()
        load_plugins(plugin_names(argv))  # before the flags: their choices include the plugins'
        command, module, config = parse_config(argv)
        getattr(module, COMMANDS[command][2])(config)
    except RegditError as error:
        # a DataLoader worker's error arrives as "Caught RegditError in DataLoader worker
        # ...\n<traceback>\n regdit.RegditError: <message>": the message is the last line
        message = str(error).strip().splitlines()[-1].removeprefix(
            f"{RegditError.__module__}.RegditError: ")
        sys.exit(f"regdit {command}: error: {message}")
    except Stopped as stopped:  # on a signal: at a safe point, or in set-up (regdit.run.preemption)
        # every process of a launch stopped at the same point: one line per node (its first
        # process) says so
        if int(os.environ.get("WORLD_SIZE", 1)) == 1 or os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"regdit {command}: {stopped}", file=sys.stderr)
        sys.exit(EXIT_STOPPED)
    except KeyboardInterrupt:  # Ctrl-C in a command without safe points
        # every finished file is complete (atomic writes): nothing to clean up
        resumes = " (rerun the same command to continue)" if command in RESUMABLE_COMMANDS else ""
        print(f"\nregdit {command}: interrupted{resumes}", file=sys.stderr)
        sys.exit(130)
    except Exception as error:
        # a full disk, a read-only folder, a missing file: the user's to fix, said in one line;
        # anything else is a bug
        if isinstance(error, OSError) and describe_os_error(error) is not None:
            sys.exit(f"regdit {command}: error: {describe_os_error(error)}")
        if os.environ.get("REGDIT_DEBUG") == "1":
            raise
        sys.exit(internal_error(command, argv, error))

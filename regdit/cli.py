"""The `regdit` command line: one subcommand per pipeline stage.

Each stage lives in its own module exposing `add_arguments(parser)` and `main(args)`; modules are imported only
when their subcommand runs (or `--help` is asked for), so `regdit --help` stays fast.
"""
import argparse
import difflib
import importlib
import sys

from regdit import RegditError

COMMANDS = {  # name -> (module, one-line help)
    "prepare": ("regdit.prepare", "prepare images (crop, labels) or VAE latents for training"),
    "train": ("regdit.train", "train a SiT/REPA/REG model with accelerate"),
    "sample": ("regdit.sample", "generate class-conditional samples to PNGs and an ADM .npz"),
    "eval": ("regdit.evaluate", "IS / FID / sFID / precision / recall of a sample .npz (ADM evaluator)"),
    "export": ("regdit.checkpoint", "export a checkpoint's EMA weights to safetensors + config JSON"),
    "demo": ("regdit.demo", "the whole pipeline on a tiny built-in dataset, on CPU, in minutes"),
}
RESUMABLE_COMMANDS = ("prepare", "train", "sample", "demo")  # a rerun continues from the files already written


class Parser(argparse.ArgumentParser):
    """One-line errors: a subcommand's usage runs to dozens of lines, and `--help` shows it anyway."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # no "(default: None)" on required flags or twice on explained defaults
        if action.required or action.default is None or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser(command=None):
    parser = Parser(prog="regdit", description=__doc__.splitlines()[0], allow_abbrev=False)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text, allow_abbrev=False,  # no guessing
                                    formatter_class=HelpFormatter)
        if command in (None, name):
            importlib.import_module(module_name).add_arguments(sub)
            parser.command_parser = sub
    return parser


def _parse(parser, argv):
    """parse_args, with unknown flags reported by the subcommand and the closest valid names suggested."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        options = [o for action in parser.command_parser._actions for o in action.option_strings if o != "--help"]
        hints = [f"{u} (did you mean {', '.join(close)}?)" if (close := difflib.get_close_matches(u, options, 2, 0.7))
                 else u for u in unknown]
        parser.command_parser.error(f"unrecognized arguments: {' '.join(hints)}")
    return args


def parse_args(argv):
    """Parse; a command whose module has `parser_defaults(args, parser)` (presets, YAML files) gets a second parse
    with those as defaults, so that explicit flags win."""
    command = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(command)
    args = _parse(parser, argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    if hasattr(module, "parser_defaults"):
        parser.command_parser.set_defaults(**module.parser_defaults(args, parser.command_parser))
        args = _parse(parser, argv)
    return module, args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in COMMANDS), "")
    try:
        module, args = parse_args(argv)
        module.main(args)
    except (RegditError, FileNotFoundError) as error:
        sys.exit(f"regdit {command}: error: {error}")
    except KeyboardInterrupt:  # every finished file is complete (atomic writes): nothing to clean up
        resumes = " (rerun the same command to continue)" if command in RESUMABLE_COMMANDS else ""
        print(f"\nregdit {command}: interrupted{resumes}", file=sys.stderr)
        sys.exit(130)

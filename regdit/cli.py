"""The `regdit` command line: one subcommand per pipeline stage.

Each stage lives in its own module exposing `add_arguments(parser)` and `main(args)`; modules are imported only
when their subcommand runs (or `--help` is asked for), so `regdit --help` stays fast.
"""
import argparse
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


def build_parser(command=None):
    parser = argparse.ArgumentParser(prog="regdit", description=__doc__.splitlines()[0], allow_abbrev=False)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text, allow_abbrev=False,  # no guessing
                                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        if command in (None, name):
            importlib.import_module(module_name).add_arguments(sub)
            parser.command_parser = sub
    return parser


def parse_args(argv):
    """Parse; a command whose module has `parser_defaults(args, parser)` (presets, YAML files) gets a second parse
    with those as defaults, so that explicit flags win."""
    command = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    if hasattr(module, "parser_defaults"):
        parser.command_parser.set_defaults(**module.parser_defaults(args, parser.command_parser))
        args = parser.parse_args(argv)
    return module, args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        module, args = parse_args(argv)
        module.main(args)
    except (RegditError, FileNotFoundError) as error:
        command = next((a for a in argv if a in COMMANDS), "")
        sys.exit(f"regdit {command}: error: {error}")

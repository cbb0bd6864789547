"""One configuration path: a dataclass defines the settings; command-line flags, an optional YAML file
(`--config FILE.yaml`) and named presets (`--preset NAME`) fill it. Precedence: explicit flag > YAML > preset > default.
"""
import argparse
import dataclasses
from pathlib import Path

import yaml

from regdit import RegditError

# The paper's recipes (REG, arXiv 2507.01467, and its baselines), as flag values.
PRESETS = {
    "reg-sit-xl2-dinov2b": dict(model="SiT-XL/2", method="reg", enc_type="dinov2-vit-b", encoder_depth=8,
                                proj_coeff=0.5, cls=0.03, batch_size=256, max_train_steps=4_000_000),
    "reg-sit-l2-dinov2b": dict(model="SiT-L/2", method="reg", enc_type="dinov2-vit-b", encoder_depth=8,
                               proj_coeff=0.5, cls=0.03, batch_size=256, max_train_steps=400_000),
    "reg-sit-b2-dinov2b": dict(model="SiT-B/2", method="reg", enc_type="dinov2-vit-b", encoder_depth=4,
                               proj_coeff=0.5, cls=0.03, batch_size=256, max_train_steps=400_000),
    "repa-sit-xl2-dinov2b": dict(model="SiT-XL/2", method="repa", enc_type="dinov2-vit-b", encoder_depth=8,
                                 proj_coeff=0.5, batch_size=256, max_train_steps=4_000_000),
    "sit-xl2": dict(model="SiT-XL/2", method="sit", proj_coeff=0.0, batch_size=256, max_train_steps=7_000_000),
}


def flag(default, help, **argparse_kwargs):
    """A dataclass field that is also a command-line flag `--field-name`. The flag's type is the default's type
    (booleans get `--x/--no-x`); fields defaulting to None pass `type=`."""
    return dataclasses.field(default=default, metadata=dict(help=help, **argparse_kwargs))


def add_dataclass_arguments(parser, config_class):
    for field in dataclasses.fields(config_class):
        kwargs = dict(field.metadata)
        names = [f"--{field.name.replace('_', '-')}"] + kwargs.pop("aliases", [])
        if isinstance(field.default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.setdefault("type", type(field.default))
        parser.add_argument(*names, dest=field.name, default=field.default, **kwargs)
    parser.add_argument("--config", type=Path, default=None, help="YAML file of flag values (names with - or _)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="a named recipe of the paper")


def checked_values(parser, values, source):
    """argparse converts and checks command-line values only: do the same for preset and YAML values (a YAML file
    written by a run, unset settings as null, reads back as it was written)."""
    checked = dict(values)
    for action in parser._actions:
        if action.dest not in values or values[action.dest] is None and action.default is None:
            continue
        value = values[action.dest]
        if isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                raise RegditError(f"{source}: {action.dest} {value!r} is not true or false")
            continue
        if value is False and action.choices and "no" in action.choices:
            value = "no"  # YAML 1.1 reads an unquoted `no` as false
        try:
            value = action.type(str(value)) if action.type else value  # str(): YAML's 3.5 is not an int
        except (TypeError, ValueError):
            raise RegditError(f"{source}: {action.dest} {value!r} is not a valid {action.type.__name__}") from None
        if action.choices is not None and value not in action.choices:
            raise RegditError(f"{source}: {action.dest} {value!r} is not one of {', '.join(map(str, action.choices))}")
        checked[action.dest] = value
    return checked


def preset_and_yaml_defaults(args, config_class, parser):
    """Flag defaults from `--preset` and `--config FILE.yaml`, to be applied before the final parse so that
    explicit flags still win."""
    names = {f.name for f in dataclasses.fields(config_class)}
    defaults = checked_values(parser, PRESETS[args.preset], f"preset {args.preset}") if args.preset else {}
    if args.config is not None:
        if not args.config.is_file():
            raise RegditError(f"config file {args.config} does not exist: pass a YAML file of flag values")
        try:
            values = yaml.safe_load(args.config.read_text()) or {}
        except yaml.YAMLError as error:
            raise RegditError(f"config file {args.config} is not valid YAML ({' '.join(str(error).split())})") from None
        if not isinstance(values, dict):
            raise RegditError(f"config file {args.config} must be a mapping of flag names to values")
        values = {k.replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(values) - names)
        if unknown:
            raise RegditError(f"config file {args.config} has unknown settings {', '.join(unknown)}: "
                              "see `regdit train --help` for the valid names")
        defaults.update(checked_values(parser, values, f"config file {args.config}"))
    return defaults


def config_from_args(args, config_class):
    return config_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)})

"""One configuration path for every command: a dataclass declares the settings (type from the
annotation, default and help from `flag`); command-line flags, an optional YAML file (`--config
FILE.yaml`) and, for commands whose config has `PRESETS`, a named recipe (`--preset NAME`) fill it.
Precedence: explicit flag > YAML > preset > default.

A field may hold another settings dataclass (`nested`): its fields are flags too, named with that
class's FLAG_PREFIX (`TrainConfig.eval`, an `EvalSampling`, gives `--eval-cfg-scale`). Flags, YAML
files and the settings a run records (`flat_settings`) all use these flat names.
"""
import argparse
import dataclasses
import datetime
import math
import os
import types
import typing
from pathlib import Path
from typing import ClassVar

import yaml

from regdit import RegditError
from regdit.files import check_regular_file

RANGE_KEYS = ("at_least", "above", "at_most", "below")
NOT_FOR_ARGPARSE = ("aliases", "positional", "required", "allow_inf", "nested", *RANGE_KEYS)
# What a YAML file of settings may hold, checked before it is composed: its size bounds the memory
# and time spent on it, and anchors and aliases are refused because a few hundred bytes of nested
# aliases compose to gigabytes.
YAML_MAX_BYTES = 1 << 20
# nested collections; PyYAML's scanner slows quadratically with depth, its composer recurses
YAML_MAX_DEPTH = 32
YAML_OPENS = (yaml.BlockMappingStartToken, yaml.BlockSequenceStartToken, yaml.FlowMappingStartToken,
              yaml.FlowSequenceStartToken)
YAML_CLOSES = (yaml.BlockEndToken, yaml.FlowMappingEndToken, yaml.FlowSequenceEndToken)
# libyaml's parser when installed: ten times faster
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# what YAML gives for one value (an unquoted date is a date)
SCALARS = (str, int, float, bool, datetime.date)


def flag(default, help, *, aliases=(), positional=False, required=False, at_least=None, above=None,
         at_most=None, below=None, allow_inf=False, **argparse_kwargs):
    """A dataclass field that is also the command-line flag `--field-name` (or a positional
    argument).

    `aliases`: further spellings (the official `--ref_batch`). `required`: must be given by a flag
    or the YAML file (its default is then None). `at_least`, `above`, `at_most`, `below`: the
    accepted range, checked when a `Settings` config is made. A float must be finite unless
    `allow_inf` (say in `help` what infinity means). Other keywords go to `argparse.add_argument`
    (choices, metavar, action)."""
    metadata = dict(help=help, aliases=list(aliases), positional=positional, required=required,
                    at_least=at_least, above=above, at_most=at_most, below=below,
                    allow_inf=allow_inf, **argparse_kwargs)
    return dataclasses.field(default=default, metadata=metadata)


def nested(settings_class, help):
    """A field holding a `settings_class` instance (default: its defaults), whose fields are flags
    named with its FLAG_PREFIX."""
    return dataclasses.field(default_factory=settings_class, metadata=dict(help=help, nested=True))


def redefault(settings_class, name, default):
    """`settings_class`'s flag `name` with another default, for a subclass of other defaults."""
    return dataclasses.field(default=default, metadata=settings_class.__dataclass_fields__[name]
                             .metadata)


def flag_name(field, prefix=""):
    if field.metadata.get("positional"):
        return field.name.upper()
    return f"--{prefix + '-' if prefix else ''}{field.name.replace('_', '-')}"


def flag_names(field, prefix=""):
    """The flag and its aliases (the official spellings), with the prefix of nested settings."""
    return [flag_name(field, prefix), *(f"--{prefix}-{alias[2:]}" if prefix else alias
                                        for alias in field.metadata.get("aliases", []))]


def leaf_fields(config_class, prefix=""):
    """(flat name, field, flag prefix, declaring class) of every flag of `config_class`, those of
    nested settings included."""
    for field in dataclasses.fields(config_class):
        if field.metadata.get("nested"):
            inner = typing.get_type_hints(config_class)[field.name]
            yield from leaf_fields(inner, inner.FLAG_PREFIX)
        else:
            yield (f"{prefix}_{field.name}" if prefix else field.name), field, prefix, config_class


class Settings:
    """Base of the command configs: every field's declared range is checked when a config is made
    (from flags, YAML or Python), so a bad setting is one line naming the flag, its value and the
    accepted range before any file is touched. `check()` adds the rules that relate several
    settings. FLAG_PREFIX names the flags of a class used as `nested` settings."""
    FLAG_PREFIX: ClassVar[str] = ""

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if field.metadata.get("nested"):  # checked when it was made, under its own flag names
                continue
            value = getattr(self, field.name)
            bounds = {k: field.metadata.get(k) for k in RANGE_KEYS}
            # an alias may be what the user wrote
            name = "/".join(flag_names(field, self.FLAG_PREFIX))
            if isinstance(value, float) and not (math.isfinite(value) or math.isinf(value)
                                                 and field.metadata.get("allow_inf")):
                raise RegditError(f"{name} {value}: must be a finite number")
            if value is None or all(bound is None for bound in bounds.values()):
                continue
            if (bounds["at_least"] is not None and value < bounds["at_least"]
                    or bounds["above"] is not None and value <= bounds["above"]
                    or bounds["at_most"] is not None and value > bounds["at_most"]
                    or bounds["below"] is not None and value >= bounds["below"]):
                accepted = " and ".join(f"{key.replace('_', ' ')} {bound}"
                                        for key, bound in bounds.items() if bound is not None)
                raise RegditError(f"{name} {value}: must be {accepted}")
            # argparse checks them on the command line, this everywhere
            choices = field.metadata.get("choices")
            if choices is not None and value is not None and value not in choices:
                raise RegditError(f"{name} {value}: must be one of {', '.join(map(str, choices))}")
        self.check()

    def check(self):
        """Rules between settings; raise RegditError naming the flags (`flag_of`)."""

    def flag_of(self, name):
        """The flag of the field `name` with its aliases, as the user writes them
        (`--sampler/--mode`)."""
        field = next(f for f in dataclasses.fields(self) if f.name == name)
        return "/".join(flag_names(field, self.FLAG_PREFIX))


def field_type(config_class, name):
    """(value type, is a list) from the field's annotation: `int | None` gives (int, False),
    `list[str]` (str, True)."""
    hint = typing.get_type_hints(config_class)[name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


def add_dataclass_arguments(parser, config_class):
    """One argparse argument per flag of `config_class`, then `--config` and (with `PRESETS`)
    `--preset`."""
    for name, field, prefix, owner in leaf_fields(config_class):
        kwargs = {k: v for k, v in field.metadata.items() if k not in NOT_FOR_ARGPARSE}
        if field.metadata.get("required"):
            kwargs["help"] += " (required)"
        value_type, is_list = field_type(owner, field.name)
        if value_type is bool:
            kwargs.setdefault("action", argparse.BooleanOptionalAction)
        elif "action" not in kwargs:
            kwargs.setdefault("type", value_type)
        if is_list:
            kwargs["nargs"] = "*"
        if field.metadata.get("positional"):
            parser.add_argument(field.name, **{"nargs": "?", **kwargs}, default=field.default)
        else:
            parser.add_argument(*flag_names(field, prefix), dest=name, default=field.default,
                                **kwargs)
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML file of settings (names with - or _)")
    # read and imported before parsing (regdit.run.plugins); declared for --help
    parser.add_argument("--plugin", action="append", metavar="FILE_OR_MODULE",
                        help="import this file (.py) or module first: the samplers, loss terms, "
                             "time distributions, encoders, dataset layouts or methods it "
                             "registers become choices (repeatable; also `plugin:` in --config)")
    presets = getattr(config_class, "PRESETS", None)
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), default=None,
                            help="a named recipe of the paper")


def checked_values(parser, values, source):
    """argparse converts and checks command-line values only: do the same for preset and YAML values
    (a YAML file written by a run, unset settings as null, reads back as it was written)."""
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
        if action.nargs == "*" and not isinstance(value, list):
            raise RegditError(f"{source}: {action.dest} {value!r} is not a list")
        items = []
        for item in value if action.nargs == "*" else [value]:
            # str() would make a list a folder name, a mapping a number's text
            if not isinstance(item, SCALARS):
                kinds = {dict: "a mapping", list: "a list", type(None): "empty"}
                kind = kinds.get(type(item), type(item).__name__)
                raise RegditError(f"{source}: {action.dest}{' item' * (action.nargs == '*')} "
                                  f"{item!r} is {kind}, not a single value")
            try:
                # str(): YAML's 3.5 is not an int
                item = action.type(str(item)) if action.type else item
            except (TypeError, ValueError):
                raise RegditError(f"{source}: {action.dest} {item!r} is not a valid "
                                  f"{action.type.__name__}") from None
            if action.choices is not None and item not in action.choices:
                raise RegditError(f"{source}: {action.dest} {item!r} is not one of "
                                  f"{', '.join(map(str, action.choices))}")
            items.append(item)
        checked[action.dest] = items if action.nargs == "*" else items[0]
    return checked


def read_yaml(path, what):
    """The content of a YAML file that regdit reads (`what` names it in messages: "config file",
    "run settings"): UTF-8 text of at most YAML_MAX_BYTES, without anchors or aliases, nested at
    most YAML_MAX_DEPTH deep, checked token by token before anything is composed. Anything else is a
    one-line RegditError naming the file."""
    path = Path(path)
    if not path.exists():
        raise RegditError(f"{what} {path} does not exist: pass a YAML file of settings")
    if path.is_dir():
        raise RegditError(f"{what} {path} is a folder: pass a YAML file of settings")
    check_regular_file(path, what)
    with open(path, "rb") as f:
        data = f.read(YAML_MAX_BYTES + 1)
    if len(data) > YAML_MAX_BYTES:
        raise RegditError(f"{what} {path} is larger than {YAML_MAX_BYTES >> 20} MB: pass a YAML "
                          "file of settings")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RegditError(f"{what} {path} is not UTF-8 text (byte {error.start} is "
                          f"0x{data[error.start]:02x}): pass a YAML file of settings, saved as "
                          "UTF-8") from None
    try:
        depth = 0
        for token in yaml.scan(text, Loader=YAML_LOADER):
            depth += isinstance(token, YAML_OPENS) - isinstance(token, YAML_CLOSES)
            if isinstance(token, (yaml.AnchorToken, yaml.AliasToken)):
                problem = ("YAML anchors and aliases (&NAME, *NAME) are not accepted; "
                           "write each value out")
            elif depth > YAML_MAX_DEPTH:
                problem = (f"nested more than {YAML_MAX_DEPTH} levels deep; settings are a mapping "
                           "of names to values")
            else:
                continue
            raise RegditError(f"{what} {path} line {token.start_mark.line + 1}: {problem}")
        check_unique_keys(yaml.compose(text, Loader=YAML_LOADER), f"{what} {path}")
        return yaml.load(text, Loader=YAML_LOADER)
    except yaml.YAMLError as error:
        raise RegditError(f"{what} {path} is not valid YAML "
                          f"({' '.join(str(error).split())})") from None


def check_unique_keys(node, where):
    """A one-line RegditError for a key given twice in a mapping of the YAML `node`: PyYAML keeps
    the last one silently."""
    children = node.value if isinstance(node, yaml.SequenceNode) else []
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                if (key.tag, key.value) in seen:
                    raise RegditError(f"{where} line {key.start_mark.line + 1}: {key.value} is "
                                      "given twice; give each key once")
                seen.add((key.tag, key.value))
            children += [key, value]
    for child in children:
        check_unique_keys(child, where)


def read_yaml_config(path, config_class, command):
    """The settings of a `--config` file, names with - or _, unknown names refused."""
    values = read_yaml(path, "config file") or {}
    if not isinstance(values, dict):
        raise RegditError(f"config file {path} must be a mapping of setting names to values")
    # spelling in the file -> flat setting name: the names, and the flags with their aliases
    names = {}
    for name, field, prefix, _ in leaf_fields(config_class):
        names.update({flag[2:].replace("-", "_"): name for flag in flag_names(field, prefix)
                      if flag[:2] == "--"})
        names[name] = name
    spelled = [(names.get(key, key), str(k)) for k, key in
               ((k, str(k).replace("-", "_")) for k in values
                                      if k != "plugin")]
    for name in {name for name, _ in spelled}:
        spellings = [written for other, written in spelled if other == name]
        if len(spellings) > 1:
            raise RegditError(f"config file {path} gives {name} twice ({', '.join(spellings)}): "
                              "give each setting once")
    values = {name: values[written] for name, written in spelled}
    unknown = sorted(set(values) - set(names.values()))
    if unknown:
        raise RegditError(f"config file {path} has unknown settings {', '.join(unknown)}: "
                          f"see `regdit {command} --help` for the valid names")
    return values


def preset_and_yaml_defaults(args, config_class, parser, command):
    """Defaults from `--preset` and `--config FILE.yaml`, applied before the final parse so that
    flags still win."""
    defaults = {}
    if getattr(args, "preset", None):
        defaults = checked_values(parser, config_class.PRESETS[args.preset],
                                  f"preset {args.preset}")
    if args.config is not None:
        values = read_yaml_config(args.config, config_class, command)
        defaults.update(checked_values(parser, values, f"config file {args.config}"))
    return defaults


def config_from_args(args, config_class, prefix=""):
    """The `config_class` of parsed flags (nested settings made first, from their prefixed
    flags)."""
    values = {}
    for field in dataclasses.fields(config_class):
        if field.metadata.get("nested"):
            inner = typing.get_type_hints(config_class)[field.name]
            values[field.name] = config_from_args(args, inner, inner.FLAG_PREFIX)
        else:
            values[field.name] = getattr(args, f"{prefix}_{field.name}" if prefix else field.name)
    return config_class(**values)


def flat_settings(config):
    """{flat name: value} of every flag of a config: what a run records and what a YAML file
    holds."""
    settings = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.metadata.get("nested"):
            prefix = f"{value.FLAG_PREFIX}_" if value.FLAG_PREFIX else ""
            settings.update({prefix + name: inner for name, inner in flat_settings(value).items()})
        else:
            settings[field.name] = value
    return settings


def missing_required(config):
    """The flags of required settings that neither the command line nor the YAML file gave."""
    return [flag_name(field, prefix) for name, field, prefix, _ in leaf_fields(type(config))
            if field.metadata.get("required") and flat_settings(config)[name] in (None, [])]


# the setting of a run's saved settings that records the folder they were saved in
FOLDER = "folder"


def changed_setting(previous, current, may_change, paths=()):
    """The first setting, other than those in `may_change`, whose value in a run's saved settings
    `previous` differs from `current` (both dicts); None when a rerun may continue that run. The
    settings named in `paths` (absolute paths) are the same also where they lie, relative to the
    folder of the settings (their setting FOLDER), where they lay: a run folder moved or copied with
    its inputs beside it continues."""
    return next(iter(changed_settings(previous, current, may_change, paths)), None)


def changed_settings(previous, current, may_change, paths=()):
    """Every setting that `changed_setting` finds changed, in the order of `current`."""
    return [k for k in current if k not in may_change and k != FOLDER and k in previous
            and not (previous[k] == current[k] or k in paths and moved_along(previous, current, k))]


def moved_along(previous, current, name):
    """True when the path setting `name` of `current` lies where that of `previous` lay, relative to
    the folder of each (FOLDER)."""
    values = previous[name], current[name], previous.get(FOLDER), current.get(FOLDER)
    if not all(isinstance(value, str) and os.path.isabs(value) for value in values):
        return False
    before, now, folder_before, folder_now = values
    return os.path.relpath(before, folder_before) == os.path.relpath(now, folder_now)

"""One configuration path for every command: flags from the config dataclass, `--config FILE.yaml`,
required settings, `--help`."""
import dataclasses
import importlib

import pytest
import yaml

from regdit.commands.cli import COMMANDS, main, parse_config
from regdit.config import field_type, flag_names, flat_settings, leaf_fields


def config_class(command):
    module, class_name, _, _ = COMMANDS[command]
    return getattr(importlib.import_module(module), class_name)


def filled(command):
    """The default config of `command` with every required setting given (a list for list
    settings)."""
    cls = config_class(command)
    given = {f.name: [f"given-{f.name}"] if field_type(cls, f.name)[1] else f"given-{f.name}"
             for f in dataclasses.fields(cls) if f.metadata.get("required")}
    return dataclasses.replace(cls(), **given)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command.split(), "--help"])
    help_text = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--config" in help_text
    # every setting is a flag (or the positional one)
    for _, field, prefix, _ in leaf_fields(config_class(command)):
        assert all(f"{name} " in help_text or f"{name}," in help_text
                   for name in flag_names(field, prefix)) or field.metadata.get("positional")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_reads_all_its_settings_from_yaml(command, tmp_path):
    expected = filled(command)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(flat_settings(expected)))
    parsed_command, _, config = parse_config([*command.split(), "--config",
                                              str(tmp_path / "c.yaml")])
    assert parsed_command == command and config == expected


@pytest.mark.parametrize("command", [c for c in sorted(COMMANDS) if any(
    f.metadata.get("required") for f in dataclasses.fields(config_class(c)))])
def test_required_settings_are_one_line_errors(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(command.split())
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"regdit {command}: error: the following arguments are required: ")


def test_flags_win_over_yaml(tmp_path):
    (tmp_path / "c.yaml").write_text("ckpt: a.pt\nnum-steps: 20\ncfg_scale: 4.0\n")
    _, _, config = parse_config(["sample", "--config", str(tmp_path / "c.yaml"),
                                 "--cfg-scale", "1.5"])
    assert (config.ckpt, config.sampling.num_steps, config.sampling.cfg_scale) == ("a.pt", 20, 1.5)

"""`--plugin FILE_OR_MODULE`: a researcher's own code, imported before the flags are parsed, so that
what it registers (a sampler in `SAMPLERS`, a loss term in `LOSS_TERMS`, a distribution of t in
`TIME_DISTRIBUTIONS`, an encoder in `ENCODER_TYPES`/`FAMILIES`, a dataset layout in `LAYOUTS`, a
method in `METHODS`) is a choice of the command, listed by `--help`.

Only what the user names is imported: `--plugin` on the command line (repeatable) or `plugin:` (a
name or a list) in the `--config` file. A training run records its plugins in its checkpoints and
its config.yaml, and resuming or sampling such a checkpoint without them is one line naming them.
"""
import importlib
import importlib.util
import os
import sys
import traceback

from regdit import RegditError

LOADED = []  # the plugins of this process, as recorded: a file's absolute path or a module name


def plugin_names(argv):
    """The plugins named by `--plugin X` / `--plugin=X` in argv and under `plugin:` in the file of
    `--config`, in that order."""
    from regdit.config import read_yaml

    names, config = [], None
    for i, word in enumerate(argv):
        for option, target in (("--plugin", names), ("--config", None)):
            value = (argv[i + 1] if word == option and i + 1 < len(argv)
                     else word[len(option) + 1:] if word.startswith(option + "=") else None)
            if value is not None and target is None:
                config = value
            elif value is not None:
                target.append(value)
    if config is not None and os.path.isfile(config):
        settings = read_yaml(config, "config file")
        listed = settings.get("plugin") if isinstance(settings, dict) else None
        if listed is not None and not (isinstance(listed, str) or isinstance(listed, list) and
                                       all(isinstance(name, str) for name in listed)):
            raise RegditError(f"config file {config}: plugin must be a file or module name, or a "
                              f"list of them, not {listed!r:.60}")
        names += [listed] if isinstance(listed, str) else listed or []
    return names


def load_plugins(names):
    """Import each plugin once: a path ending in .py as a file, anything else as a module."""
    for name in names:
        is_file = name.endswith(".py")
        recorded = os.path.abspath(name) if is_file else name
        if recorded in LOADED:
            continue
        if is_file and not os.path.isfile(name):
            raise RegditError(f"--plugin {name}: no such file")
        try:
            if is_file:
                module_name = f"regdit_plugin_{len(LOADED)}_{os.path.basename(name)[:-3]}"
                spec = importlib.util.spec_from_file_location(module_name, recorded)
                module = importlib.util.module_from_spec(spec)
                sys.modules[module_name] = module
                spec.loader.exec_module(module)
            else:
                importlib.import_module(name)
        except ModuleNotFoundError as error:
            if not is_file and error.name == name.split(".")[0]:
                raise RegditError(f"--plugin {name}: no module {name!r} on the Python path "
                                  "(a file needs its .py ending)") from None
            raise RegditError(plugin_failure(name, error)) from None
        except Exception as error:  # the plugin's own code: where it failed, in one line
            raise RegditError(plugin_failure(name, error)) from None
        LOADED.append(recorded)


def plugin_failure(name, error):
    where = ((error.filename, error.lineno) if isinstance(error, SyntaxError)
             else traceback.extract_tb(error.__traceback__)[-1][:2])
    return f"--plugin {name} failed: {type(error).__name__}: {error} ({where[0]}, line {where[1]})"


def require_plugins(recorded, source):
    """Refuse to continue or sample `source` without the plugins it was trained with."""
    missing = [name for name in recorded or () if name not in LOADED]
    if missing:
        flags = " ".join(f"--plugin {name}" for name in missing)
        raise RegditError(f"{source} was trained with plugins that are not loaded: pass {flags}")

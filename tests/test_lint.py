"""The repository passes its own linter (ruff, configured in pyproject.toml), and keeps the shape
docs/design.md promises: the layers on disk import only downward (the method in regdit/core imports
nothing but the package's errors and settings schema), no module imports itself back through
others, no function runs past one screen and the optimizer step fits in 40 lines."""
import ast
import importlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "regdit"
# bottom to top; "regdit" is the package's own modules (errors, config, files)
LAYERS = ("regdit", "core", "storage", "run", "commands", "extras")
MAX_FUNCTION_LINES = 80


def test_ruff_check_is_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def module_name(path):
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def layer(module):
    if module == "regdit.__main__":  # `python -m regdit`: the command line, above everything
        return "extras"
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else "regdit"


def regdit_imports(module):
    """The regdit modules `module` imports, at its top or inside functions (`from regdit import X`
    counts X when it is a module, else the package itself)."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("regdit"):
            found.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES
                         else node.module for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("regdit"))
    return found - {module}


def test_the_method_is_its_own_layer():
    assert {layer(module) for module in MODULES} == set(LAYERS)
    core = sorted(m for m in MODULES if layer(m) == "core" and not m.endswith(".core"))
    assert core == [f"regdit.core.{name}"
                    for name in ("interpolants", "loss", "models", "samplers", "sampling")]


def test_the_layers_import_only_downward():
    upward = {module: sorted(imported for imported in regdit_imports(module)
                             if LAYERS.index(layer(imported)) > LAYERS.index(layer(module)))
              for module in MODULES}
    assert {module: imported for module, imported in upward.items() if imported} == {}
    for module in MODULES:
        if layer(module) == "core":  # plain PyTorch, read like DiT / EDM2
            assert regdit_imports(module) <= {"regdit", "regdit.config", *[
                m for m in MODULES if layer(m) == "core"]}, module
    package = ast.parse((PACKAGE / "__init__.py").read_text())
    assert not [node for node in ast.walk(package) if isinstance(node, ast.ImportFrom)]


def test_no_import_cycle():
    graph = {module: regdit_imports(module) for module in MODULES}

    def visit(module, trail):
        assert module not in trail, " -> ".join([*trail, module])
        for imported in graph.get(module, ()):
            visit(imported, [*trail, module])
    for module in graph:
        visit(module, [])


def test_functions_fit_one_screen_and_the_optimizer_step_40_lines():
    lengths = {f"{module}.{node.name}": node.end_lineno - node.lineno + 1
               for module, path in MODULES.items() for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert {name: n for name, n in lengths.items() if n > MAX_FUNCTION_LINES} == {}
    assert lengths["regdit.commands.train.train_step"] <= 40


def test_processes_wait_for_each_other_on_the_cpu_group_only():
    """regdit.run.preemption's `barrier` and `main_process_first` wait on gloo, where a process that
    has left is seen at once; accelerate's wait on NCCL on GPUs, until its timeout."""
    calls = {f"{module}:{node.lineno}" for module, path in MODULES.items()
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Attribute)
             and (node.attr in ("wait_for_everyone", "main_process_first")  # accelerate's
                  or node.attr == "barrier" and getattr(node.value, "id", None) == "dist")}
    assert {call for call in calls if not call.startswith("regdit.run.preemption:")} == set()


def test_the_public_api_is_importable_from_the_package_top_level():
    """`from regdit import ...` names the documented surface; `import regdit` alone loads no torch
    (the command line's --help stays fast)."""
    result = subprocess.run([sys.executable, "-c", "import sys, regdit; print('torch' in "
                             "sys.modules)"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["False"]
    import regdit
    exec("from regdit import *", {})
    for name, module in regdit.PUBLIC.items():
        assert getattr(regdit, name) is getattr(importlib.import_module(module), name), name

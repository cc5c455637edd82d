"""The CLIs under scripts/ as modules, for the tests that call their functions directly."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """`scripts/<name>.py`, executed as the module `<name>_cli` (scripts/ is not a package). The module
    is registered in `sys.modules`, where dataclasses and pickling look their module up by name."""
    spec = importlib.util.spec_from_file_location(f"{name}_cli", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module

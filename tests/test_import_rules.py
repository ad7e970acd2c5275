"""The import rules in pyproject.toml ([tool.importlinter]) hold, and lint-imports does fail on a broken one.

The contracts themselves (torch- and gRPC-free core, gRPC only in the API layer, a client without the
service or torch) are explained next to them in pyproject.toml; `make check` runs the same command.
"""

from __future__ import annotations

import importlib.util
import json
import pkgutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import gpt2_service

ROOT = Path(__file__).resolve().parents[1]
# The venv's own entry point, next to the interpreter running the tests (not whatever is on PATH).
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def config() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        section: dict[str, Any] = tomllib.load(f)["tool"]["importlinter"]
    return section


def contract(contract_id: str) -> dict[str, Any]:
    (found,) = [c for c in config()["contracts"] if c.get("id") == contract_id]
    return found


def lint_imports(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert LINT_IMPORTS.exists(), (
        f"{LINT_IMPORTS} is missing: import-linter is in the dev extra (`make check` installs it)"
    )
    # --no-cache: no .import_linter_cache/ left in the tree (the graph takes well under a second anyway).
    command = [str(LINT_IMPORTS), "--no-logo", "--no-cache", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=60)


def toml_config(section: dict[str, Any]) -> str:
    """[tool.importlinter] as TOML; its values are strings, booleans and lists of strings, which JSON writes as TOML does."""
    lines = ["[tool.importlinter]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in section.items() if key != "contracts"]
    for c in section["contracts"]:
        lines += ["", "[[tool.importlinter.contracts]]"]
        lines += [f"{key} = {json.dumps(value)}" for key, value in c.items()]
    return "\n".join(lines) + "\n"


def test_the_import_rules_hold() -> None:
    done = lint_imports(cwd=ROOT)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    # Every contract in pyproject.toml was read and checked, none skipped.
    assert f"Contracts: {len(config()['contracts'])} kept, 0 broken." in output, output


def test_a_broken_rule_fails_the_check(tmp_path: Path) -> None:
    # The project's contracts plus two that today's code breaks: a direct import (the API layer's
    # rich status is protobuf) and an indirect one (the demo runs the engine, which is torch).
    section = config()
    section["contracts"] = [
        *section["contracts"],
        {
            "id": "deliberately-broken-direct",
            "name": "deliberately broken: the API status module without protobuf",
            "type": "forbidden",
            "source_modules": ["gpt2_service.api.status"],
            "forbidden_modules": ["google"],
        },
        {
            "id": "deliberately-broken-indirect",
            "name": "deliberately broken: the demo without torch",
            "type": "forbidden",
            "source_modules": ["gpt2_service.demo"],
            "forbidden_modules": ["torch"],
        },
    ]
    path = tmp_path / "pyproject.toml"
    path.write_text(toml_config(section), encoding="utf-8")

    done = lint_imports(str(path), cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    kept = len(section["contracts"]) - 2
    assert f"Contracts: {kept} kept, 2 broken." in output, output
    assert "gpt2_service.api.status -> google" in output, output
    assert "gpt2_service.demo -> gpt2_service.engine.frontend" in output, output  # the first link of the chain to torch


def test_the_engine_modules_contract_names_every_engine_module() -> None:
    # A module added to gpt2_service is an engine module unless it goes into the API layer; the
    # forbidden contract lists its source modules by name, so a new one must be added there.
    everything = {f"gpt2_service.{m.name}" for m in pkgutil.iter_modules(gpt2_service.__path__)}
    expected = everything - {"gpt2_service.api", "gpt2_service.main", "gpt2_service.__main__"}
    assert set(contract("engine-modules")["source_modules"]) == expected


def test_the_external_packages_named_in_the_contracts_exist() -> None:
    # import-linter skips a forbidden external package that nothing imports, so a misspelt name
    # would make a rule that never fails. Every name must be a package installed here.
    names: set[str] = set()
    for c in config()["contracts"]:
        names.update(c.get("forbidden_modules", []), c.get("protected_modules", []))
    external = {n for n in names if n.split(".")[0] not in config()["root_packages"]}
    assert external, names
    missing = sorted(n for n in external if importlib.util.find_spec(n) is None)
    assert not missing, missing

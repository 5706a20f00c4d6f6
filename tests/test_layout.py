"""The layout a newcomer reads: the README's module map is the tree, the layers call one
way, and the project installs one top-level package.

Oracles: the tree on disk, the modules' import statements read with `ast`, and
setuptools' own package discovery."""

import ast
import re
import tomllib
from pathlib import Path

from project import REPO

PACKAGE = REPO / "unisd"


def module_map() -> list[str]:
    """The paths the README's module map lists, an indented line taken under the folder above it."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"## Module map\n+```\n(.*?)```", readme, re.S).group(1)
    paths, folder = [], ""
    for line in block.splitlines():
        if not line.strip() or line.startswith("    "):  # a continued description
            continue
        name = line.split()[0]
        if line.startswith("  "):
            paths.append(folder + name)
        else:
            paths.append(name)
            folder = name if name.endswith("/") else ""
    return paths


def test_every_path_in_the_module_map_exists():
    missing = [p for p in module_map() if not (REPO / p).exists()]
    assert missing == []


def test_every_module_and_subpackage_is_in_the_module_map():
    listed = set(module_map())
    modules = {f"unisd/{p.name}" for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    packages = {f"unisd/{p.name}/" for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert sorted((modules | packages) - listed) == []
    # a folder whose files the map lists one by one lists all of them
    for folder in {
        p.rsplit("/", 1)[0] + "/" for p in listed if p.startswith("unisd/") and p.count("/") > 1 and not p.endswith("/")
    }:
        files = {f"{folder}{p.name}" for p in (REPO / folder).glob("*.py") if p.name != "__init__.py"}
        assert sorted(files - listed) == [], folder


def imports(path: Path) -> set[str]:
    """The modules a file imports, at the top or inside functions (relative imports resolved)."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            found.add(".".join(p for p in (base, node.module) if p))
    return found


def test_the_layers_call_one_way():
    """Only the orchestration and the CLI over it know Prefect's side: the chain, the
    stages and the method never import it, so nothing calls back up."""
    orchestration = PACKAGE / "orchestration"
    for path in PACKAGE.rglob("*.py"):
        if orchestration in path.parents or path.name == "cli.py":
            continue
        names = imports(path)
        assert not {n for n in names if n.startswith("unisd.orchestration")}, path
        if path.name != "console.py":  # it only sets up Prefect's console handler for flow commands
            assert not {n for n in names if n.split(".")[0] == "prefect"}, path
    # the flow reaches the stages only through the chain and the registry
    for path in orchestration.glob("*.py"):
        assert not {n for n in imports(path) if n.startswith("unisd.stages.")}, path


def test_flows_folder_holds_entrypoints_of_the_package_flows():
    from prefect.flows import load_flow_from_entrypoint

    from unisd.orchestration import pipeline, study

    assert load_flow_from_entrypoint(f"{REPO}/flows/pipeline.py:pipeline") is pipeline.pipeline
    assert load_flow_from_entrypoint(f"{REPO}/flows/study.py:compare") is study.compare
    assert load_flow_from_entrypoint(f"{REPO}/flows/study.py:ablation") is study.ablation
    assert not (REPO / "flows" / "__init__.py").exists()  # a folder of files, not a package


def test_one_top_level_package_is_installed():
    from setuptools import find_packages

    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {name.split(".")[0] for name in find_packages(str(REPO), include=include)} == {"unisd"}

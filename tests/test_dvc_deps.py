"""dvc.yaml names every module a stage imports: each stage's transitive imports inside
``pipeline/`` and ``stages/`` (tests/import_graph.py, an import inside a function counted too)
are covered by its code deps, a file or a folder above it. ``pipeline/config.py`` is covered by
the resolved params' ``config_code`` (stages/config.py), which stands for its logic while its
defaults reach the stages as resolved values. Static: no DVC run."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import yaml
from import_graph import ROOT, import_graph, module_files

CONFIG_MODULE = "pipeline/config.py"
RESOLVED = "params.resolved.yaml"


def stage_specs(dvc_yaml: dict) -> dict[str, dict]:
    """{stage name: its definition}, a foreach stage's ``do`` as the stage itself."""
    return {name: spec.get("do", spec) for name, spec in dvc_yaml["stages"].items()}


def stage_module(spec: dict) -> str:
    """The module a stage's command runs (``python -m stages.X ...``)."""
    found = re.match(r"python -m (stages\.\w+)\b", spec["cmd"])
    assert found, f"not a `python -m stages.X` command: {spec['cmd']}"
    return found.group(1)


def resolved_keys(spec: dict) -> list[str]:
    """The keys a stage lists from params.resolved.yaml."""
    keys: list[str] = []
    for entry in spec.get("params", []):
        if isinstance(entry, dict) and RESOLVED in entry:
            keys += entry[RESOLVED] or []
    return keys


def imports_of(module: str, root: Path = ROOT) -> dict[str, list[str]]:
    """{file (relative to root): the chain of imports from ``module`` that reaches it}, the
    packages an imported module sits in (their ``__init__``, which Python runs first) too."""
    graph, files = _graph(root)
    chains: dict[str, list[str]] = {}
    todo = [(module, [module])]
    while todo:
        name, chain = todo.pop()
        if name in chains:
            continue
        chains[name] = chain
        parents = [".".join(name.split(".")[:n]) for n in range(1, name.count(".") + 1)]
        for target in sorted(graph.get(name, set()) | {p for p in parents if p in files}):
            todo.append((target, [*chain, target]))
    return {str(files[m].relative_to(root)): chain for m, chain in chains.items()}


@functools.cache
def _graph(root: Path) -> tuple[dict[str, set[str]], dict[str, Path]]:
    return import_graph(root), module_files(root)


def uncovered(spec: dict, root: Path = ROOT) -> list[str]:
    """One line for each imported file no code dep of the stage covers."""
    deps = [d for d in spec.get("deps", []) if d.startswith(("pipeline/", "stages/"))]
    lines = []
    for path, chain in sorted(imports_of(stage_module(spec), root).items()):
        if path == CONFIG_MODULE and "config_code" in resolved_keys(spec):
            continue
        if not any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps):
            lines.append(f"{path} (imported via {' -> '.join(chain)})")
    return lines


def missing_deps(spec: dict, root: Path = ROOT) -> list[str]:
    """Code deps that name no file or folder (a module renamed or merged away)."""
    deps = [d for d in spec.get("deps", []) if d.startswith(("pipeline/", "stages/"))]
    return [d for d in deps if not (root / d).exists()]


def test_every_module_a_stage_imports_is_one_of_its_deps() -> None:
    specs = stage_specs(yaml.safe_load((ROOT / "dvc.yaml").read_text()))
    problems = []
    for name, spec in specs.items():
        problems += [f"stage {name}: {line} is not in its deps" for line in uncovered(spec)]
        problems += [f"stage {name}: dep {d} does not exist" for d in missing_deps(spec)]
    assert not problems, "dvc.yaml:\n" + "\n".join(problems)


def test_every_stage_but_config_reads_config_code_and_config_reads_the_module() -> None:
    """pipeline/config.py's logic reruns every stage (config_code); its file is config's dep."""
    specs = stage_specs(yaml.safe_load((ROOT / "dvc.yaml").read_text()))
    assert CONFIG_MODULE in specs["config"]["deps"]
    without = [n for n, s in specs.items() if "config_code" not in resolved_keys(s)]
    assert without == ["config"]


def test_the_check_names_the_stage_and_the_module_a_dep_misses() -> None:
    """Not vacuous: prepare without its data wing, or without config_code, is caught."""
    specs = stage_specs(yaml.safe_load((ROOT / "dvc.yaml").read_text()))
    prepare = dict(specs["prepare"])
    prepare["deps"] = [d for d in prepare["deps"] if d != "pipeline/data"]
    lines = uncovered(prepare)
    want = "pipeline/data/prepare.py (imported via stages.prepare"
    assert any(line.startswith(want) for line in lines)
    assert not any(line.startswith(CONFIG_MODULE) for line in lines)
    prepare["params"] = [{RESOLVED: ["scale", "data"]}]
    assert any(line.startswith(f"{CONFIG_MODULE} (imported via") for line in uncovered(prepare))
    prepare["deps"] = [*prepare["deps"], "pipeline/no_such_module.py"]
    assert missing_deps(prepare) == ["pipeline/no_such_module.py"]


def test_an_import_inside_a_function_counts(tmp_path: Path) -> None:
    """A stage that imports a module only when it runs (as stages.train imports the trainer)."""
    (tmp_path / "pipeline" / "wing").mkdir(parents=True)
    (tmp_path / "stages").mkdir()
    (tmp_path / "pipeline" / "__init__.py").write_text("")
    (tmp_path / "pipeline" / "wing" / "__init__.py").write_text("")
    (tmp_path / "pipeline" / "wing" / "late.py").write_text("X = 1\n")
    (tmp_path / "stages" / "__init__.py").write_text("")
    (tmp_path / "stages" / "s.py").write_text("def main():\n    from pipeline.wing import late\n")
    spec = {"cmd": "python -m stages.s", "deps": ["stages/s.py", "stages/__init__.py"]}
    assert [line.split(" ")[0] for line in uncovered(spec, tmp_path)] == [
        "pipeline/__init__.py",
        "pipeline/wing/__init__.py",
        "pipeline/wing/late.py",
    ]
    spec["deps"] += ["pipeline/__init__.py", "pipeline/wing"]
    assert uncovered(spec, tmp_path) == []

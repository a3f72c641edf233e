"""The resolved configuration of a scale: ``python -m stages.config [--scale NAME] [--write PATH]``.

Without ``--write`` it prints every resolved key. With ``--write`` (dvc.yaml's first stage,
``config``) it writes params.yaml's preset resolved with pipeline/config.py's defaults to
``params.resolved.yaml``: sorted YAML, the same bytes for the same values. Every other stage
lists the sections and keys it reads from that file as DVC params, so dvc.lock records every
value that made an output, a key the preset leaves out included, and a default changed in the
code reruns exactly the stages that read it (docs/parameters.md). ``config_code`` in the file
stands for pipeline/config.py's logic: a hash of its syntax tree without docstrings and without
the dataclass fields' defaults (those are the resolved values themselves), so a comment or a
docstring changes nothing and a changed rule or helper reruns every stage.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from pipeline import config
from pipeline.atomic import write_text
from pipeline.cli import entry_point
from pipeline.config import Config, load_config

RESOLVED = Path("params.resolved.yaml")
HEADER = (
    "# Written by `python -m stages.config --write` (dvc.yaml stage `config`): params.yaml's\n"
    "# preset resolved with pipeline/config.py's defaults. Do not edit: set keys in params.yaml.\n"
)


def config_code(path: Path = Path(config.__file__)) -> str:
    """A hash of pipeline/config.py's logic: its syntax tree without docstrings and without the
    defaults of its dataclasses' fields (comments and layout are not in the tree)."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                node.body = node.body[1:] or [ast.Pass()]
        if isinstance(node, ast.ClassDef) and any(map(_is_dataclass, node.decorator_list)):
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign):
                    stmt.value = None
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()[:16]


def _is_dataclass(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return (isinstance(target, ast.Name) and target.id == "dataclass") or (
        isinstance(target, ast.Attribute) and target.attr == "dataclass"
    )


def resolved(cfg: Config, code: str | None = None) -> dict[str, Any]:
    """Every field of ``cfg`` as plain YAML values (tuples as lists), each variant without its
    name (the key), and ``config_code``; new sections of Config come along by themselves."""
    out: dict[str, Any] = {"config_code": code or config_code()}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "variants":
            value = {name: {k: v for k, v in dataclasses.asdict(var).items() if k != "name"}
                     for name, var in value.items()}  # fmt: skip
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        out[f.name] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def render(values: dict[str, Any]) -> str:
    """The file's text: the header, then ``values`` as YAML with sorted keys."""
    return HEADER + yaml.safe_dump(values, sort_keys=True, default_flow_style=False)


def write_resolved(cfg: Config, path: Path = RESOLVED) -> dict[str, Any]:
    """Write ``resolved(cfg)`` to ``path`` atomically; returns what it wrote."""
    values = resolved(cfg)
    write_text(path, render(values))
    return values


@entry_point
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", help="a preset of params.yaml (default: its `scale` key)")
    parser.add_argument("--params", default=None, help="params file (default: params.yaml)")
    parser.add_argument("--write", type=Path, metavar="PATH", help=f"write {RESOLVED} there")
    args = parser.parse_args(argv)
    cfg = load_config(args.params, args.scale)
    if args.write:
        values = write_resolved(cfg, args.write)
        print(f"wrote {args.write}: scale {cfg.scale}, config_code {values['config_code']}")
        return
    print(json.dumps(cfg.flat(), indent=2, default=str))
    print(f"variants: {', '.join(cfg.variants)}")
    if cfg.stand_in_reasons():
        print(f"note: metrics at this scale are stand-in ({', '.join(cfg.stand_in_reasons())})")


if __name__ == "__main__":
    main()

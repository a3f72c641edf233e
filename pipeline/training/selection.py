"""The paper's checkpoint selection: FID throughout training, the lowest one reported.

App. B: "evaluated throughout training for sample quality ... reported on the minimum FID value
over the course of training". Every ``train.eval_every`` steps a checkpoint's EMA weights are
scored (pipeline.training.eval_during); each result is one file in the Ray run's folder, so a
restarted run never redoes an evaluation::

    checkpoints/<variant>/<run>/evals/
      step-000050000.json   {"step", "fid", "n_samples", "seconds"}
      best/                 a copy of the checkpoint with the lowest FID so far (Ray Train
                            keeps only the last keep_checkpoints: the best may be gone)

``train.select`` then names the checkpoint that becomes models/<variant>/: ``last`` (the final
one) or ``best_fid`` (the copy in ``best/``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_dir, write_json
from pipeline.training.checkpoint import META

EVALS = "evals"
BEST = "best"
TAG_SELECTION = "ddpm.selection"  # MLflow tag of the variant run: selection_note's text


def checkpoint_step(folder: Path) -> int | None:
    """The step of a Ray Train checkpoint folder ``checkpoint_<step>`` (None: not one)."""
    name = folder.name
    if not name.startswith("checkpoint_") or not (folder / META).is_file():
        return None
    try:
        return int(name.removeprefix("checkpoint_"))
    except ValueError:
        return None


class EvalRecords:
    """The evaluations of one Ray run (``<run_dir>/evals``), written atomically, one per step."""

    def __init__(self, run_dir: str | Path):
        self.folder = Path(run_dir) / EVALS

    def path(self, step: int) -> Path:
        return self.folder / f"step-{step:09d}.json"

    def done(self) -> set[int]:
        """Steps already evaluated (by this run or an earlier attempt of it)."""
        return {r["step"] for r in self.all()}

    def all(self) -> list[dict[str, Any]]:
        """Every record, by step."""
        if not self.folder.is_dir():
            return []
        records = [json.loads(p.read_text()) for p in sorted(self.folder.glob("step-*.json"))]
        return sorted(records, key=lambda r: r["step"])

    def best(self) -> dict[str, Any] | None:
        """The record with the lowest FID (the earliest on a tie), or None."""
        records = self.all()
        return min(records, key=lambda r: (r["fid"], r["step"])) if records else None

    def add(self, record: dict[str, Any], checkpoint: Path | None = None) -> None:
        """Store one evaluation; when it is the best so far, keep a copy of ``checkpoint``.

        The copy is made first, so a crash in between leaves at worst a best/ that a later
        (re)evaluation replaces, never a record whose best checkpoint is missing.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        best = self.best()
        key = (record["fid"], record["step"])  # as best(): the lowest FID, the earliest on a tie
        if checkpoint is not None and (best is None or key < (best["fid"], best["step"])):
            with atomic_dir(self.folder / BEST) as tmp:
                shutil.copytree(checkpoint, tmp, dirs_exist_ok=True)
                write_json(tmp / "selected.json", record)
        write_json(self.path(record["step"]), record)

    def best_checkpoint(self) -> Path | None:
        """The kept copy of the best checkpoint (None when nothing was evaluated)."""
        folder = self.folder / BEST
        return folder if (folder / "selected.json").is_file() else None


def due_steps(run_dir: Path, eval_every: int, done: set[int]) -> list[tuple[int, Path]]:
    """(step, folder) of the run's checkpoints at a multiple of ``eval_every`` not yet done."""
    if eval_every <= 0 or not Path(run_dir).is_dir():
        return []
    due = []
    for folder in sorted(Path(run_dir).glob("checkpoint_*")):
        step = checkpoint_step(folder)
        if step is not None and step > 0 and step % eval_every == 0 and step not in done:
            due.append((step, folder))
    return due


def select_checkpoint(select: str, records: EvalRecords, last: Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint folder that becomes models/<variant>/ and what the report says of it.

    Returns (folder, {"select", "selected_step" (None for last), "evaluations", "fid"}).
    ``best_fid`` with no evaluation at all falls back to ``last`` and says so.
    """
    evaluated = records.all()
    info: dict[str, Any] = {"select": select, "evaluations": len(evaluated)}
    best = records.best()
    if (  # best_checkpoint() once: the folder it checked is the one returned
        select == "best_fid"
        and best is not None
        and (folder := records.best_checkpoint()) is not None
    ):
        return folder, {
            **info,
            "selected_step": best["step"],
            "fid": best["fid"],
        }
    if select == "best_fid":
        info["note"] = "no evaluation during training finished: the last checkpoint"
    return last, {**info, "selected_step": None, "fid": None}


def selection_note(selection: dict[str, Any]) -> str:
    """One line for the report: which checkpoint was selected and of how many evaluated."""
    n = selection.get("evaluations", 0)
    if selection.get("selected_step") is not None:
        return (
            f"checkpoint of step {selection['selected_step']} selected (lowest FID "
            f"{selection['fid']:.4g} of {n} evaluated during training)"
        )
    if selection.get("select") == "best_fid":
        return f"last checkpoint ({n} evaluated during training, none finished)"
    return f"last checkpoint ({n} evaluated during training)" if n else "last checkpoint"

"""pipeline.cli: one-line user errors and the stages' fast exit (run_stage)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow

ROOT = Path(__file__).resolve().parents[1]


def run_program(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(cwd)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_run_stage_ends_the_mlflow_run_flushes_and_skips_teardown(tmp_path):
    """The active MLflow run is FINISHED, unterminated output is printed, atexit hooks skipped."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = run_program(
        f"""
        import atexit, sys
        import mlflow
        from pipeline.cli import entry_point, run_stage

        @entry_point
        def main():
            mlflow.set_tracking_uri({uri!r})
            run = mlflow.start_run(run_name="stage")
            mlflow.log_metric("x", 1.5)
            print(run.info.run_id)
            sys.stdout.write("no newline at the end")
            atexit.register(lambda: print("teardown ran"))

        run_stage(main)
        """,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    run_id, tail = done.stdout.split("\n")
    assert tail == "no newline at the end"  # flushed, and the atexit hook never ran
    run = mlflow.MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics == {"x": 1.5}


def test_run_stage_user_error_is_one_line_and_exit_2(tmp_path):
    done = run_program(
        """
        from pipeline.cli import entry_point, run_stage
        from pipeline.errors import UserError

        @entry_point
        def main():
            raise UserError("params.yaml: no such variant 'x'")

        run_stage(main)
        """,
        tmp_path,
    )
    assert done.returncode == 2
    assert done.stderr == "error: params.yaml: no such variant 'x'\n"
    assert done.stdout == ""


def test_a_diverged_training_stage_is_one_line_and_exit_2(tmp_path):
    """The train stage's divergence stop (TrainingDivergedError, raised by the driver after
    Ray Train; its message: tests/test_train_ray.py) leaves the stage as a user error does."""
    message = (
        "training diverged: the loss or the gradient norm became NaN or infinite in step 7 of "
        "12; last good checkpoint: after step 4, checkpoints/v/run/checkpoint_000000004"
    )
    done = run_program(
        f"""
        from pipeline.cli import entry_point, run_stage
        from pipeline.training.loop import TrainingDivergedError

        @entry_point
        def main():
            raise TrainingDivergedError({message!r})

        run_stage(main)
        """,
        tmp_path,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"error: {message}\n"


def test_closed_stdout_ends_quietly(tmp_path):
    """``python -m stages.config | head -1``: the reader closes the pipe; no traceback, 141."""
    code = textwrap.dedent(
        """
        from pipeline.cli import entry_point

        @entry_point
        def main():
            for i in range(100_000):
                print("line", i)

        main()
        """
    )
    program = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert program.stdout.readline() == "line 0\n"
    program.stdout.close()  # as `head -1` does after its line
    stderr = program.stderr.read()
    assert program.wait(timeout=60) == 141
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr

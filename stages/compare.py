"""Two reproductions side by side from MLflow: ``python -m stages.compare A B``.

A and B: a reproduction run's id (the report stage's parent run; a variant run's id stands for
its parent) or an experiment name (its latest reproduction). The store is ``--tracking-uri``,
else MLFLOW_TRACKING_URI, else the project's ``mlflow.db`` in the working directory. Prints each
variant's FID, IS and NLL of both as ``value ± error (n)``, B - A and whether the difference is
within 2 combined errors (pipeline/report/compare.py).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from pipeline.cli import entry_point
from pipeline.errors import UserError


@entry_point
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", metavar="RUN_OR_EXPERIMENT")
    parser.add_argument("b", metavar="RUN_OR_EXPERIMENT")
    parser.add_argument("--tracking-uri", help="MLflow store (default: see above)")
    args = parser.parse_args(argv)
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        db = Path("mlflow.db").resolve()
        if not db.is_file():
            raise UserError(f"{db}: no MLflow store here; pass --tracking-uri or run the pipeline")
        uri = f"sqlite:///{db}"
    import mlflow

    from pipeline.report.compare import render, resolve

    mlflow.set_tracking_uri(uri)
    print(render(resolve(args.a), resolve(args.b)), end="")


if __name__ == "__main__":
    main()

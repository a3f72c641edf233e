"""Each variant's exported model in MLflow: a logged pyfunc, registered, the best FID aliased.

:func:`register_export` logs ``export/<V>/`` (pipeline.report.export) to the variant's MLflow
run as a pyfunc model from code (:class:`DDPMSampler`, set by pipeline/report/pyfunc_model.py:
loading unpickles nothing; ``predict`` takes a number of samples and a seed and returns uint8
images [n, R, R, 3]; the export folder is its artifact, this project's ``pipeline`` package
its code) and registers it as ``ddpm-<scale>-<variant>``:

- one version per reproduction: a version's tag ``ema_sha256`` names the weights, and weights
  already registered add no version (a rerun with nothing changed, or a stage rerun by an edit
  that changed no weight);
- every version tagged with its figures (``fid``, ``is``, ``nll_bpd``), their ``verdict``,
  the ``git_commit``, the ``stand_in`` label and the run;
- the alias ``best`` on the version with the lowest FID among the model's own versions.

Loading: ``mlflow.pyfunc.load_model("models:/ddpm-<scale>-<variant>@best").predict({"n": 4,
"seed": 0})``.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from pipeline.report.model_card import CardFacts, verdict_text

ALIAS = "best"
ARTIFACT = "export"  # the pyfunc's artifact: the export folder
TAG_SHA = "ema_sha256"
TAG_FID = "fid"


class DDPMSampler(PythonModel):
    """An exported variant as an MLflow pyfunc: ``predict({"n": N, "seed": S})`` draws N
    images with this project's sampler (pipeline.model.diffusion: every Table-2 variant, the
    ones diffusers cannot express included); uint8 [N, R, R, 3]. The same seed gives the same
    images on the same machine. Logged from code (pipeline/report/pyfunc_model.py)."""

    def load_context(self, context: Any) -> None:
        self._load(Path(context.artifacts[ARTIFACT]))

    def _load(self, folder: Path) -> None:
        from pipeline.model.convert import load_diffusers_unet
        from pipeline.model.diffusion import GaussianDiffusion, linear_beta_schedule

        spec = json.loads((folder / "ddpm.json").read_text())
        self.model, _ = load_diffusers_unet(folder)
        d = spec["diffusion"]
        betas = linear_beta_schedule(d["num_timesteps"], d["beta_start"], d["beta_end"])
        self.diffusion = GaussianDiffusion(
            betas, spec["mean_type"], spec["sampler_var_type"], spec["loss_type"]
        )

    # a DataFrame: what MLflow hands over under the logged signature (:func:`signature`), and
    # a hint MLflow derives no schema of its own from
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict | None = None
    ) -> np.ndarray:
        import torch

        from pipeline.data.loaders import to_uint8

        n, seed = _request(model_input)
        size, channels = self.model.resolution, self.model.in_channels
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            x = self.diffusion.p_sample_loop(
                self.model, (n, channels, size, size), generator=generator
            )
        return to_uint8(x)


def _request(model_input: Any) -> tuple[int, int]:
    """(n, seed) from a dict, a one-row DataFrame or a list of one dict; ValueError otherwise."""
    if hasattr(model_input, "to_dict"):  # a DataFrame (what MLflow hands over)
        rows = model_input.to_dict("records")
        model_input = rows[0] if len(rows) == 1 else None
    elif isinstance(model_input, list) and len(model_input) == 1:
        model_input = model_input[0]
    if not isinstance(model_input, dict) or "n" not in model_input:
        raise ValueError('predict takes {"n": number of images, "seed": integer (default 0)}')
    n, seed = int(model_input["n"]), int(model_input.get("seed", 0))
    if not 1 <= n <= 10_000:
        raise ValueError(f"n = {n}: ask for 1 to 10000 images")
    return n, seed


def model_card_verdict(facts: CardFacts) -> str:
    """The verdicts of the variant's table row, as one tag value."""
    return verdict_text(facts.row)


def version_tags(metrics: dict[str, Any], verdict: str, commit: str | None) -> dict[str, str]:
    """A version's tags: FID (against train), IS, NLL, the verdict, git commit, stand-in."""

    def num(key: str) -> str:
        value = metrics.get(key)
        return "" if value is None or not math.isfinite(float(value)) else f"{float(value):.6g}"

    return {
        TAG_FID: num("fid_train"),
        "is": num("is_mean"),
        "nll_bpd": num("nll_bpd"),
        "verdict": verdict,
        "git_commit": commit or "unknown",
        "stand_in": str(bool(metrics.get("stand_in"))).lower(),
    }


def register_export(
    folder: Path, name: str, run_id: str, sha256: str, tags: dict[str, str]
) -> tuple[str, bool]:
    """Log ``folder`` to run ``run_id`` and register it as ``name`` unless a version of these
    weights (``sha256``) exists; then move the alias ``best``. Returns (version, added). The
    tracking URI must be set (pipeline.report.tracking.setup)."""
    import mlflow
    from mlflow import MlflowClient

    import pipeline

    client = MlflowClient()
    for version in client.search_model_versions(f"name = '{name}'"):
        if version.tags.get(TAG_SHA) == sha256:
            set_best_alias(client, name)
            return str(version.version), False
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        # the schema is given (signature); no input example on purpose: MLflow would sample
        # with it at logging (minutes at the paper's size on a CPU)
        warnings.filterwarnings("ignore", ".*An input example was not provided", UserWarning)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(__file__).with_name("pyfunc_model.py")),  # from code
            artifacts={ARTIFACT: str(folder)},
            code_paths=[str(Path(pipeline.__file__).parent)],
            pip_requirements=_requirements(),
            signature=signature(),
        )
    created = mlflow.register_model(info.model_uri, name, tags={**tags, TAG_SHA: sha256})
    set_best_alias(client, name)
    return str(created.version), True


def set_best_alias(client: Any, name: str) -> str | None:
    """Point ``best`` at the version with the lowest FID tag (ties: the earliest); None when no
    version has a FID."""
    scored = []
    for version in client.search_model_versions(f"name = '{name}'"):
        text = version.tags.get(TAG_FID, "")
        if text:
            scored.append((float(text), int(version.version)))
    if not scored:
        return None
    best = str(min(scored)[1])
    client.set_registered_model_alias(name, ALIAS, best)
    return best


def signature() -> Any:
    """The pyfunc's schema: columns ``n`` (images) and ``seed`` (optional) in, uint8 images
    [n, R, R, 3] out."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    inputs = Schema([ColSpec("long", "n"), ColSpec("long", "seed", required=False)])
    outputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))])
    return ModelSignature(inputs=inputs, outputs=outputs)


def _requirements() -> list[str]:
    """The pinned packages the pyfunc imports (what this environment has)."""
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "numpy", "safetensors", "pyyaml", "pandas")]

"""The model card of an exported variant: ``export/<V>/README.md``.

A YAML header that diffusers and model hubs read (``library_name``, ``pipeline_tag``,
``datasets``, ``metrics``, and a ``model-index`` with the figures unless they come from a
stand-in), then: what the model is, how to load it both ways (diffusers, MLflow), how it was
trained (the resolved settings, steps, seed, git commit, the weights' sha256), its row of the
paper's table with our errors and the verdict (read from the report stage's CSV), the sample
grid, and the stand-in label wherever it applies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import yaml

from pipeline.config import STAND_IN_NOTE

HUB_DATASETS = {
    "cifar10": "cifar10",
    "lsun_bedroom": "lsun",
    "lsun_church_outdoor": "lsun",
    "lsun_cat": "lsun",
}
FIGURE_PARTS = ("paper", "ours", "ours err", "ours n", "margin", "verdict")


@dataclass
class CardFacts:
    """What the card says; every value comes from the pipeline's outputs."""

    name: str  # the registered model's name, ddpm-<scale>-<variant>
    variant: str
    scale: str
    dataset: str
    types: dict[str, str]  # mean_type, var_type (trained), sampler_var_type, loss_type
    resolution: int
    num_timesteps: int
    betas: tuple[float, float]  # beta_start, beta_end (linear)
    train: dict[str, Any]  # steps, batch_size, lr, ema_decay, seed, ...
    steps_trained: int | None  # model.json's: the step of the selected weights
    weights_sha256: str
    weights_lock: str | None  # dvc.lock's hash of models/<V> (stage train@V), None if absent
    git_commit: str | None
    metrics: dict[str, Any]  # metrics/<V>.json
    table: str  # "Table 2" or "Table 3 (...)"
    row: dict[str, dict[str, Any]] = field(default_factory=dict)  # figure -> FIGURE_PARTS
    diffusers_reason: str = ""  # why DDPMPipeline cannot sample it ("" when it can)
    stand_in_reasons: list[str] = field(default_factory=list)


def table_row(table: pd.DataFrame, variant: str) -> dict[str, dict[str, Any]]:
    """A report CSV's row of ``variant`` as {figure: {part: value}} (FIGURE_PARTS)."""
    rows = table[table["variant"] == variant]
    if rows.empty:
        return {}
    row = rows.iloc[0]
    figures = [c[: -len(" paper")] for c in table.columns if c.endswith(" paper")]
    return {f: {part: _clean(row.get(f"{f} {part}")) for part in FIGURE_PARTS} for f in figures}


def _clean(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value.item() if hasattr(value, "item") else value


def verdict_text(row: dict[str, dict[str, Any]]) -> str:
    """``FID: reproduced; IS: inconclusive`` (figures the paper gives a number for)."""
    return "; ".join(f"{f}: {p['verdict']}" for f, p in row.items() if p.get("verdict")) or "none"


def header(facts: CardFacts) -> dict[str, Any]:
    """The card's YAML metadata (model-index only for figures that are not stand-ins)."""
    meta: dict[str, Any] = {
        "library_name": "diffusers",
        "pipeline_tag": "unconditional-image-generation",
        "tags": ["ddpm", "diffusion", "unconditional-image-generation", "ddpm-repro"],
        "metrics": ["fid", "inception_score"],
    }
    if facts.stand_in_reasons:
        meta["tags"].append("stand-in")
    if facts.dataset in HUB_DATASETS:
        meta["datasets"] = [HUB_DATASETS[facts.dataset]]
    results = [
        {"type": kind, "name": label, "value": float(facts.metrics[key])}
        for key, kind, label in (
            ("fid_train", "fid", "FID (against train)"),
            ("is_mean", "inception_score", "Inception Score"),
            ("nll_bpd", "nll", "NLL test (bits/dim)"),
        )
        if facts.metrics.get(key) is not None
    ]
    if results and not facts.stand_in_reasons:
        meta["model-index"] = [
            {
                "name": facts.name,
                "results": [
                    {
                        "task": {"type": "unconditional-image-generation"},
                        "dataset": {"name": facts.dataset, "type": facts.dataset},
                        "metrics": results,
                    }
                ],
            }
        ]
    return meta


def _fmt(x: Any) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _row_lines(facts: CardFacts) -> list[str]:
    if not facts.row:
        return [f"This variant has no row in the paper's {facts.table}."]
    lines = [
        "| figure | paper | ours ± error (n) | margin | verdict |",
        "|---|---|---|---|---|",
    ]
    for figure, p in facts.row.items():
        ours = _fmt(p["ours"])
        if p["ours err"] is not None:
            ours += f" ± {_fmt(p['ours err'])}"
        if p["ours n"] is not None:
            ours += f" ({_fmt(p['ours n'])})"
        cells = [figure, _fmt(p["paper"]), ours, _fmt(p["margin"]), _fmt(p["verdict"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_card(facts: CardFacts) -> str:
    """The README.md text."""
    t = facts.types
    stand_in = (
        f"**{STAND_IN_NOTE}** ({', '.join(facts.stand_in_reasons)}): every figure on this card."
        if facts.stand_in_reasons
        else ""
    )
    lines = ["---", yaml.safe_dump(header(facts), sort_keys=True).rstrip(), "---", ""]
    lines += [f"# {facts.name}", ""]
    if stand_in:
        lines += [stand_in, ""]
    lines += [
        f"A DDPM (Ho, Jain, Abbeel 2020) trained by ddpm-repro: the `{facts.variant}` variant "
        f"({t['mean_type']} prediction, {t['loss_type']} objective, {t['var_type']} variance; "
        f"sampled with {t['sampler_var_type']}), {facts.dataset} at "
        f"{facts.resolution}x{facts.resolution}, scale `{facts.scale}`, T = {facts.num_timesteps}, "
        f"betas linear from {facts.betas[0]:g} to {facts.betas[1]:g}.",
        "",
        "## Load it",
        "",
    ]
    if facts.diffusers_reason:
        lines += [
            f"diffusers cannot sample this variant: {facts.diffusers_reason}. The folder "
            'holds the network only (`UNet2DModel.from_pretrained(folder, subfolder="unet")`) '
            "and no pipeline, so `DDPMPipeline.from_pretrained` refuses it; sample it with the "
            "MLflow model below (this project's sampler).",
            "",
        ]
    else:
        lines += [
            "```python",
            "from diffusers import DDPMPipeline",
            'pipe = DDPMPipeline.from_pretrained("path/to/this/folder")',
            f"images = pipe(batch_size=4, num_inference_steps={facts.num_timesteps}).images",
            "```",
            "",
        ]
    lines += [
        "```python",
        "import mlflow",
        f'model = mlflow.pyfunc.load_model("models:/{facts.name}@best")',
        'images = model.predict({"n": 4, "seed": 0})  # uint8 [4, R, R, 3]',
        "```",
        "",
        "## Training",
        "",
    ]
    for key, value in sorted(facts.train.items()):
        lines.append(f"- `train.{key}`: {value}")
    lines += [
        f"- steps trained (the selected EMA weights' step): {_fmt(facts.steps_trained)}",
        f"- git commit: {facts.git_commit or 'unknown (not run in a git checkout)'}",
        f"- EMA weights sha256: `{facts.weights_sha256}` (models/{facts.variant}/ema.pt)",
        f"- dvc.lock: train@{facts.variant} recorded models/{facts.variant} as "
        f"`{facts.weights_lock or 'not recorded yet'}`, beside every resolved param that made it",
        "",
        f"## Results: the paper's {facts.table}",
        "",
        *_row_lines(facts),
        "",
    ]
    nll = facts.metrics.get("nll_bpd")
    if nll is not None:
        lines += [
            f"NLL test: {nll:.4f} bits/dim (± {_fmt(facts.metrics.get('nll_bpd_se'))}, "
            f"{_fmt(facts.metrics.get('nll_images'))} images).",
            "",
        ]
    if stand_in:
        lines += [stand_in, ""]
    lines += ["## Samples", "", "![samples](samples.png)", ""]
    return "\n".join(lines)

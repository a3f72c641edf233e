"""Stage ``export``: a variant's model leaving the pipeline (``stages.export --variant V``).

Reads models/<V>/ (the selected EMA weights), metrics/<V>.json, reports/ and samples/<V>/grid.png;
writes export/<V>/: a diffusers pipeline folder (``DDPMPipeline.from_pretrained``, or the
network alone where diffusers cannot sample the variant), ddpm.json and the model card
README.md; then logs it to the variant's MLflow run and registers it as
``ddpm-<scale>-<V>`` (a version per set of weights, alias ``best`` on the lowest FID).
docs/export.md.
"""

from __future__ import annotations

import argparse

from pipeline import layout
from pipeline.atomic import atomic_dir
from pipeline.cli import entry_point, run_stage
from pipeline.config import load_config
from pipeline.training.published import skip_reason


@entry_point
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", required=True, help="a variant of params.yaml")
    parser.add_argument("--params", default=None, help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    cfg = load_config(args.params)
    variant = cfg.variant(args.variant)
    if reason := skip_reason(cfg, variant.name):
        with atomic_dir(layout.export_dir(variant.name)) as tmp:
            (tmp / "README.md").write_text(f"# {variant.name}\n\nNot run: {reason}.\n")
        print(f"{variant.name}: not run ({reason})")
        return
    from pipeline.cluster.runrecord import model_run_id
    from pipeline.report import registry, tracking
    from pipeline.report.export import write_export
    from pipeline.sampling.job import sampler_var_type

    exported = write_export(cfg, variant, sampler_var_type(cfg, variant))
    how = exported.facts.diffusers_reason or "a DDPMPipeline"
    print(f"{variant.name}: wrote {exported.folder} ({how})")
    meta = {"variant": variant.name, "run_name": exported.run_name}
    run_id = model_run_id(cfg, variant.name, meta) if exported.run_name else None
    if run_id is None:
        print(f"{variant.name}: no MLflow run to log the model into; not registered")
        return
    tracking.setup(cfg)
    facts = exported.facts
    tags = registry.version_tags(
        facts.metrics, registry.model_card_verdict(facts), facts.git_commit
    )
    version, added = registry.register_export(
        exported.folder, facts.name, run_id, facts.weights_sha256, tags
    )
    state = "registered as" if added else "already registered (same weights):"
    print(f"{variant.name}: {state} {facts.name} version {version}")


if __name__ == "__main__":
    run_stage(main)

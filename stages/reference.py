"""Reference statistics for FID: ``python -m stages.reference`` writes reference/<scale>/.

For each split of eval.fid_against: the Inception statistics of its first eval.ref_images
images (the whole split when null), with the weights named by eval.inception_weights, as
``<split>-stats.pt``, plus ``manifest.json`` (weights identity, counts, stand-in label). The
Inception pass is cached by content in work/fidelity, so a rerun over the same images with the
same weights (e.g. after an unrelated eval key changed) takes seconds.

The real-data row of every table: the first min(sample.n_samples, reference test images) test
images (the same as the test reference when there are fewer, so no extra pass), scored
like samples (FID against the train reference, IS) with the same extractor, in the manifest's
``real_data``: the floor (FID) and ceiling (IS) a reader compares the variants with.

With ``eval.inception_weights: classifier`` the extractor is the featurenet stage's network.
With ``eval.inception_device: cuda`` and no GPU in this process (a CPU head), every pass runs
as one GPU task on the cluster (pipeline.evaluation.inception_task).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch_fidelity

from pipeline import layout
from pipeline.atomic import atomic_dir, write_json
from pipeline.cli import entry_point, run_stage
from pipeline.config import load_config
from pipeline.data import open_split, read_manifest
from pipeline.data.imageviews import ImagePrefix
from pipeline.evaluation.feature_weights import project_inception_weights
from pipeline.evaluation.featurenet import classifier_scores
from pipeline.evaluation.fidelity import stand_in_label
from pipeline.evaluation.inception_task import InceptionRunner
from pipeline.model.weights import sha256_file

CACHE_ROOT = layout.FIDELITY_CACHE


@entry_point
def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    cfg = load_config()
    data_dir, out_dir = layout.data_dir(cfg.scale), layout.reference_dir(cfg.scale)
    data = read_manifest(data_dir)
    weights = project_inception_weights(cfg)
    label = stand_in_label(cfg, weights, synthetic=bool(data.get("synthetic")))
    splits = {}
    with atomic_dir(out_dir) as tmp:
        for split in cfg.eval.fid_against:
            full = open_split(data_dir, split)
            images = ImagePrefix(full, cfg.eval.ref_images or len(full))  # read in chunks
            meta = {"dataset": data["dataset"], "split": split, "stand_in": label["stand_in"]}
            path = InceptionRunner(cfg).reference_stats(
                images, split, weights, CACHE_ROOT, tmp, is_splits=cfg.eval.is_splits, meta=meta
            )
            splits[split] = _entry(path, len(images), len(full))
            print(f"reference {cfg.scale}/{split}: {len(images)} of {len(full)} images")
        real = _real_data(cfg, data_dir, tmp, weights, splits.get("test", {}).get("count"))
        weights_info = {
            "source": cfg.eval.inception_weights,
            "identity": weights.identity,
            "sha256": weights.sha256,
        }
        write_json(tmp / "manifest.json", {
            "scale": cfg.scale,
            "dataset": data["dataset"],
            "resolution": int(data["resolution"]),
            "weights": weights_info,
            "torch_fidelity": torch_fidelity.__version__,
            **label,
            "splits": splits,
            "real_data": real,
        })  # fmt: skip


def _real_data(cfg, data_dir: Path, out_dir: Path, weights, ref_test: int | None) -> dict | None:
    """FID (against the train reference) and IS of real test images, as many as samples."""
    manifest = read_manifest(data_dir)
    if "train" not in cfg.eval.fid_against or "test" not in manifest["splits"]:
        return None
    test = open_split(data_dir, "test")
    count = min(cfg.sample.n_samples, ref_test or len(test), len(test))
    if count < max(2, cfg.eval.is_splits):
        return None
    found = InceptionRunner(cfg).fid_is(
        ImagePrefix(test, count),
        {"train": out_dir / "train-stats.pt"},
        weights,
        CACHE_ROOT,
        cfg.eval.is_splits,
    )
    found.update(classifier_scores(weights, test[:count]))
    print(
        f"real data: {count} test images, FID against train {found['fid_train']:.3f}, "
        f"IS {found['is_mean']:.3f} +- {found['is_std']:.3f}"
    )
    return {
        "images": "test",
        "count": count,
        "fid_train": found["fid_train"],
        "is_mean": found["is_mean"],
        "is_std": found["is_std"],
        **{k: found[k] for k in ("classifier_confidence",) if k in found},
    }


def _entry(path: Path, count: int, available: int) -> dict:
    """One split's manifest entry."""
    return {"file": path.name, "count": count, "of": available, "sha256": sha256_file(path)}


if __name__ == "__main__":
    run_stage(main)

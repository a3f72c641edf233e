"""Stage ``featurenet``: the small classifier whose features FID and IS use on synthetic data.

``python -m stages.featurenet [--scale NAME]`` writes ``featurenet/<scale>/``: with
``eval.inception_weights: classifier``, ``classifier.pt`` (trained on the training split's
labels, seeded) and ``manifest.json`` (its sha256, train and test accuracy, the class names,
the stand-in note; no training time: dvc.lock records the folder's hash, so it holds only what
params and data determine, and the seconds are in the stage's output line); otherwise only a
manifest saying that no network is used.
"""

from __future__ import annotations

import argparse

from pipeline import layout
from pipeline.atomic import atomic_dir, write_json
from pipeline.cli import entry_point, run_stage
from pipeline.config import load_config
from pipeline.data import open_split, read_manifest
from pipeline.errors import DataError
from pipeline.evaluation import featurenet


@entry_point
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", help="a preset of params.yaml (default: its `scale` key)")
    parser.add_argument("--params", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    cfg = load_config(args.params, args.scale)
    out = layout.classifier_path(cfg.scale)
    if cfg.eval.inception_weights != "classifier":
        with atomic_dir(out.parent) as tmp:
            reason = f"eval.inception_weights is {cfg.eval.inception_weights!r}, not 'classifier'"
            manifest = {"format": featurenet.FORMAT, "used": False, "reason": reason}
            write_json(tmp / "manifest.json", manifest)
        print(f"featurenet {cfg.scale}: not used ({reason})")
        return
    data_dir = layout.data_dir(cfg.scale)
    data = read_manifest(data_dir)
    train, test = open_split(data_dir, "train"), open_split(data_dir, "test")
    if train.labels is None or test.labels is None:
        raise DataError(
            f"{data_dir}: no labels, so no feature network can be trained "
            "(eval.inception_weights: classifier needs synthetic or cifar10 data)"
        )
    names = data["splits"]["train"]["labels"]["names"]
    trained = featurenet.train_classifier(
        train[:], train.labels, test[:], test.labels, len(names),
        epochs=cfg.eval.classifier_epochs, seed=cfg.eval.seed,
    )  # fmt: skip
    with atomic_dir(out.parent) as tmp:
        sha = featurenet.save_classifier(trained.net, tmp / out.name)
        write_json(tmp / "manifest.json", {
            "format": featurenet.FORMAT,
            "used": True,
            "file": out.name,
            "sha256": sha,
            "extractor": featurenet.EXTRACTOR,
            "arch": trained.net.arch,
            "classes": names,
            "epochs": trained.epochs,
            "seed": cfg.eval.seed,
            "n_train": len(train),
            "n_test": len(test),
            "train_accuracy": trained.train_accuracy,
            "test_accuracy": trained.test_accuracy,
            "stand_in": True,
            "stand_in_note": featurenet.NOTE,
        })  # fmt: skip
    print(
        f"featurenet {cfg.scale}: {len(names)} classes, test accuracy {trained.test_accuracy:.3f} "
        f"(train {trained.train_accuracy:.3f}), trained in {trained.train_seconds:.1f} s; {out}"
    )


if __name__ == "__main__":
    run_stage(main)

"""LSUN: a small LMDB in the LSUN project's layout (webp and jpeg, several aspect ratios, one
corrupt record), prepared into shards; resumption; bad inputs; memory independent of size."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from data_formats import data_config, encode, make_lmdb, smooth_image
from PIL import Image

from pipeline.data import lsun, open_split, prepare
from pipeline.data.lsun import decode_record
from pipeline.errors import ConfigError, DataError

# (format, width, height, mode); "corrupt" is a JPEG cut in half.
RECORDS = [
    ("JPEG", 320, 256, "RGB"),
    ("WEBP", 256, 384, "RGB"),
    ("JPEG", 300, 300, "RGB"),
    ("WEBP", 200, 150, "RGB"),  # upscaled
    ("JPEG", 256, 256, "L"),  # greyscale
    ("corrupt", 320, 256, "RGB"),
    ("WEBP", 512, 341, "RGBA"),
    ("JPEG", 257, 400, "RGB"),  # odd margin
    ("WEBP", 400, 256, "RGB"),
    ("JPEG", 288, 256, "RGB"),
    ("WEBP", 256, 290, "RGB"),
    ("JPEG", 640, 480, "RGB"),
]
CORRUPT = 5


def lsun_cfg(source: Path, **data):
    settings = {"dataset": "lsun_church_outdoor", "resolution": 256, "source": str(source)}
    return data_config(**(settings | {"workers": 0, "shard_size": 4} | data))


def make_values(rng: np.random.Generator) -> list[bytes]:
    values = []
    for fmt, width, height, mode in RECORDS:
        image = smooth_image(rng, height, width)
        if mode == "L":
            image = image[..., 0]
        if mode == "RGBA":
            image = np.concatenate([image, np.full((height, width, 1), 200, np.uint8)], -1)
        blob = encode(image, "JPEG" if fmt == "corrupt" else fmt)
        values.append(blob[: len(blob) // 2] if fmt == "corrupt" else blob)
    return values


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, list[bytes], list[bytes]]:
    path = tmp_path_factory.mktemp("lsun") / "church_outdoor_train_lmdb"
    values = make_values(np.random.default_rng(0))
    return path, make_lmdb(path, values), values


def reference(value: bytes) -> np.ndarray:
    """The StyleGAN2 dataset_tool recipe: centre square crop by slicing, then Lanczos to 256."""
    image = np.asarray(Image.open(io.BytesIO(value)).convert("RGB"))
    h, w = image.shape[:2]
    crop = min(h, w)
    image = image[(h - crop) // 2 : (h + crop) // 2, (w - crop) // 2 : (w + crop) // 2]
    return np.asarray(Image.fromarray(image).resize((256, 256), Image.Resampling.LANCZOS))


def test_decode_matches_the_stylegan2_recipe(source):
    _, _, values = source
    for i, value in enumerate(values):
        if i != CORRUPT:
            np.testing.assert_array_equal(decode_record(value), reference(value), err_msg=str(i))


@pytest.mark.parametrize("size", [(400, 256), (256, 600), (600, 512)])
def test_decode_keeps_the_centre_square(size):
    width, height = size
    side = min(width, height)
    image = np.full((height, width, 3), 128, np.uint8)
    image[: (height - side) // 2] = image[(height + side) // 2 :] = (255, 0, 0)
    image[:, : (width - side) // 2] = image[:, (width + side) // 2 :] = (0, 0, 255)
    out = decode_record(encode(image, "WEBP", lossless=True))
    assert out.shape == (256, 256, 3)
    assert np.abs(out.astype(int) - 128).max() <= 1


def test_prepare_writes_shards_in_record_order(tmp_path, source):
    path, keys, values = source
    cfg = lsun_cfg(path, test_fraction=0.2, max_corrupt_fraction=0.1)
    manifest = prepare(cfg, tmp_path / "d")
    train = [reference(v) for i, v in enumerate(values[:10]) if i != CORRUPT]
    test = [reference(v) for v in values[10:]]
    np.testing.assert_array_equal(open_split(tmp_path / "d", "train")[:], np.stack(train))
    np.testing.assert_array_equal(open_split(tmp_path / "d", "test")[:], np.stack(test))
    files = manifest["splits"]["train"]["files"]
    assert [(f["path"], f["count"]) for f in files] == [
        ("train-00000.npy", 4),
        ("train-00001.npy", 3),
        ("train-00002.npy", 2),
    ]
    assert manifest["splits"]["test"]["shape"] == [2, 256, 256, 3]
    for f in files:
        assert f["sha256"] == hashlib.sha256((tmp_path / "d" / f["path"]).read_bytes()).hexdigest()
    assert manifest["corrupt"]["count"] == 1
    assert manifest["corrupt"]["records"][0]["key"] == keys[CORRUPT].decode()
    assert manifest["source"]["entries"] == manifest["source"]["records_read"] == 12
    assert manifest["dataset"] == "lsun_church_outdoor" and not manifest["synthetic"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no partial folder left


def test_parallel_decoding_gives_the_same_files(tmp_path, source):
    path = source[0]
    inline = prepare(lsun_cfg(path, max_corrupt_fraction=0.1), tmp_path / "a")
    pooled = prepare(lsun_cfg(path, max_corrupt_fraction=0.1, workers=2), tmp_path / "b")
    assert inline["splits"] == pooled["splits"]
    assert inline["source"]["records_sha256"] == pooled["source"]["records_sha256"]


def test_max_images_and_no_test_split(tmp_path, source):
    manifest = prepare(lsun_cfg(source[0], max_images=5), tmp_path / "d")
    assert manifest["splits"]["train"]["count"] == 5 and "test" not in manifest["splits"]
    with pytest.raises(DataError, match=r"no 'test' split"):
        open_split(tmp_path / "d", "test")


def test_interrupted_run_resumes_from_finished_shards(tmp_path, source, monkeypatch):
    path = source[0]
    cfg = lsun_cfg(path, test_fraction=0.2, max_corrupt_fraction=0.1)
    calls, decode_chunk = [], lsun.decode_chunk

    def decode_then_interrupt(values, resolution):
        calls.append(len(values))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return decode_chunk(values, resolution)

    monkeypatch.setattr(lsun, "decode_chunk", decode_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, tmp_path / "d")
    partial = tmp_path / ".d.partial"
    assert not (tmp_path / "d").exists()
    assert sorted(p.name for p in partial.glob("*.npy")) == ["train-00000.npy", "train-00001.npy"]
    calls.clear()
    resumed = prepare(cfg, tmp_path / "d")
    assert calls == [2, 2]  # only train-00002 and test-00000 were decoded again
    monkeypatch.undo()
    fresh = prepare(cfg, tmp_path / "e")
    assert resumed["splits"] == fresh["splits"] and resumed["corrupt"] == fresh["corrupt"]
    assert resumed["source"]["records_sha256"] == fresh["source"]["records_sha256"]


def assert_fails(tmp_path: Path, error: type, pattern: str, cfg) -> None:
    with pytest.raises(error, match=pattern) as info:
        prepare(cfg, tmp_path / "d")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "d").exists()


def test_source_not_set(tmp_path):
    cfg = data_config(dataset="lsun_bedroom", resolution=256)
    pattern = r"presets\.t\.data\.source is not set: download it from the LSUN project"
    assert_fails(tmp_path, DataError, pattern, cfg)


def test_missing_lmdb(tmp_path):
    assert_fails(tmp_path, DataError, r"no such LMDB folder", lsun_cfg(tmp_path / "nope"))


def test_empty_lmdb(tmp_path):
    make_lmdb(tmp_path / "empty", [])
    assert_fails(tmp_path, DataError, r"the LMDB database is empty", lsun_cfg(tmp_path / "empty"))


def test_not_an_lmdb(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "data.mdb").write_bytes(b"\x00junk" * 3000)
    assert_fails(tmp_path, DataError, r"not an LMDB database", lsun_cfg(tmp_path / "junk"))


def test_all_records_corrupt(tmp_path):
    make_lmdb(tmp_path / "bad", [b"not an image"] * 4)
    pattern = (
        r"4 corrupt or undecodable records among the 4 to prepare \(first: key 00000000\w+, "
        r"UnidentifiedImageError: cannot identify image file\), more than "
        r"presets\.t\.data\.max_corrupt_fraction = 0\.01 allows"
    )
    assert_fails(tmp_path, DataError, pattern, lsun_cfg(tmp_path / "bad"))
    tolerant = lsun_cfg(tmp_path / "bad", max_corrupt_fraction=1.0)
    assert_fails(tmp_path, DataError, r"no record could be decoded", tolerant)


def test_corrupt_records_above_the_threshold(tmp_path, source):
    pattern = (
        r"1 corrupt or undecodable records among the 12 to prepare \(first: key 00000005\w+, "
        r"OSError: .*\), "
        r"more than presets\.t\.data\.max_corrupt_fraction = 0\.0 allows"
    )
    assert_fails(tmp_path, DataError, pattern, lsun_cfg(source[0], max_corrupt_fraction=0.0))


def test_resolution_must_be_256(tmp_path, source):
    cfg = lsun_cfg(source[0], resolution=64)
    assert_fails(tmp_path, ConfigError, r"LSUN is prepared at 256x256", cfg)


MEMORY_SCRIPT = """
import json, re, resource, sys, time, tracemalloc
sys.path.insert(0, sys.argv[4])
from data_formats import data_config
from pipeline.data import prepare
cfg = data_config(dataset="lsun_cat", resolution=256, source=sys.argv[1], shard_size=16,
                  workers=int(sys.argv[3]), max_corrupt_fraction=0.0)
tracemalloc.start()
start = time.perf_counter()
prepare(cfg, sys.argv[2])
seconds = time.perf_counter() - start
# VmHWM, not RUSAGE_SELF: Linux carries the parent's (pytest's) peak across fork and exec.
hwm = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"seconds": seconds, "traced_peak_mb": tracemalloc.get_traced_memory()[1] / 2**20,
                  "rss_self_mb": hwm / 1024, "rss_workers_mb": workers / 1024}))
"""


def peak_memory(tmp_path: Path, count: int) -> dict:
    """Prepare ``count`` small webp/jpeg records in a fresh process; its peak memory figures."""
    rng = np.random.default_rng(count)
    shapes = [(48, 64), (64, 48)]
    values = [
        encode(smooth_image(rng, *shapes[i % 2]), ("WEBP", "JPEG")[i % 2]) for i in range(count)
    ]
    make_lmdb(tmp_path / f"src{count}", values)
    args = [str(tmp_path / f"src{count}"), str(tmp_path / f"out{count}"), "2"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), *sys.path])}
    run = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, *args, str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    assert (
        json.loads((tmp_path / f"out{count}" / "manifest.json").read_text())["splits"]["train"][
            "count"
        ]
        == count
    )
    return figures


def test_peak_memory_does_not_grow_with_the_number_of_images(tmp_path):
    small, large = peak_memory(tmp_path, 60), peak_memory(tmp_path, 240)
    print(f"\npeak memory, 60 images: {small}\npeak memory, 240 images: {large}")
    # Holding the 180 extra images (192 KiB each) would add ~34 MiB.
    assert large["traced_peak_mb"] - small["traced_peak_mb"] < 3
    assert large["rss_self_mb"] - small["rss_self_mb"] < 12
    assert large["rss_workers_mb"] - small["rss_workers_mb"] < 12

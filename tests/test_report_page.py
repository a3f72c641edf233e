"""reports/index.html: one self-contained page with the tables, the figures and the curves."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess

import mlflow
import numpy as np
import pytest
from PIL import Image
from test_report import project  # noqa: F401  (the fixture: tiny params, a SQLite store)

from pipeline.config import STAND_IN_NOTE, load_config
from pipeline.data import prepare
from pipeline.layout import data_dir
from pipeline.report import html, page, tables, tracking
from stages import report

REPRODUCTION = "tags.`ddpm.role` = 'reproduction'"
IMG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def _png(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def test_markdown_tables_become_html_tables_with_their_notes():
    import pandas as pd

    table = pd.DataFrame(
        {"variant": ["a", "b"], "FID ours": [1.5, None], "note": [STAND_IN_NOTE, "x | y"]}
    )
    out = html.markdown_to_html(tables.to_markdown(table, "Table 9: a <test>"))
    assert "<h3>Table 9: a &lt;test&gt;</h3>" in out  # the page's h1 is its title
    assert out.count("<tr") == 3 and "<th>FID ours</th>" in out
    assert '<td class="num">1.500</td>' in out and '<td class="num">—</td>' in out
    assert "<td>x | y</td>" in out  # an escaped pipe stays inside its cell
    assert '<tr class="stand-in">' in out  # the stand-in row is marked
    assert "<p><strong>Rows noted stand-in are not comparable to published numbers.</strong>" in out


def test_image_grid_is_the_images_tiled_and_enlarged():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    grid = np.asarray(Image.open(io.BytesIO(html.image_grid_png(images))))
    k, side, pad = 4, 32, html.PAD  # 8 px enlarged 4x to 32; 3 per row (ceil sqrt 5)
    assert grid.shape == (pad + 2 * (side + pad), pad + 3 * (side + pad), 3)
    for i, image in enumerate(images):
        y, x = pad + (i // 3) * (side + pad), pad + (i % 3) * (side + pad)
        np.testing.assert_array_equal(grid[y : y + side : k, x : x + side : k], image)
    assert (grid[:pad] == 255).all() and (grid[-(side + pad) :, -(side + pad) :] == 255).all()


def test_large_images_are_compacted_small_ones_kept():
    small = _png((10, 20, 30))
    assert html.compact(small) == small  # byte for byte: the figure as on disk
    rng = np.random.default_rng(1)  # noise: incompressible, like a grid of LSUN photos
    noise = rng.integers(0, 256, size=(2066, 2066, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(noise).save(out, format="PNG")
    big = out.getvalue()
    assert len(big) > 10 * html.MAX_BYTES
    smaller = html.compact(big)
    assert len(smaller) < len(big) / 10 and smaller[:2] == b"\xff\xd8"  # JPEG
    assert Image.open(io.BytesIO(smaller)).size == (html.MAX_SIDE, html.MAX_SIDE)
    assert html.data_uri(smaller).startswith("data:image/jpeg;base64,")


def _page(real_png: bytes | None = None) -> html.Page:
    fig = html.Figure("v: samples", _png((200, 0, 0)), "caption <b>", stand_in=True)
    variant = html.VariantPart("v", "eps prediction", fig, [html.Figure("v: Fig. 7", None)])
    return html.Page(
        title="DDPM reproduction: tiny scale",
        stand_in_note=f"{STAND_IN_NOTE} (synthetic data)",
        facts=[("scale", "tiny")],
        tables_md=["## Table 2\n\n| a | note |\n| --- | --- |\n| 1.0 | n |\n"],
        real_grid=html.Figure("real", real_png or _png((0, 0, 200))),
        variants=[variant],
        plots=[html.Figure("Training loss", _png((0, 200, 0)))],
    )


def test_the_page_is_self_contained():
    text = html.render_page(_page())
    assert text.isascii()  # any character as a reference: readable in every encoding
    assert "<script" not in text and "<link" not in text and "@import" not in text
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", text)  # nothing from the network
    sources = re.findall(r'<img src="([^"]*)"', text)
    assert len(sources) == 3 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "not produced" in text  # a missing figure says so in its place
    assert "caption &lt;b&gt;" in text and '<span class="badge">stand-in</span>' in text
    assert f"Every number and figure on this page: {STAND_IN_NOTE} (synthetic data)" in text
    assert "@media print" in text


def _outputs(root, cfg):
    """What sample and evaluate leave for the report: distinct PNGs, a curve, prepared data."""
    files = {}
    for i, name in enumerate(cfg.variants):
        files[name] = {}
        for j, path in enumerate(
            [root / "samples" / name / "grid.png", root / "samples" / name / "progressive.png"]
            + [root / "figures" / name / f for f, _, _ in page.FIGURES]
        ):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_png((i * 40, j * 40, 100)))
            files[name][path.name] = path.read_bytes()
        (root / "samples" / name / "manifest.json").write_text('{"sampler": "Algorithm 2"}')
        curve = root / "plots" / name / "rate_distortion.csv"
        curve.parent.mkdir(parents=True, exist_ok=True)
        curve.write_text(
            "t,steps,T_minus_t,rate_bpd,distortion_rmse\n1,20,19,0.5,2.0\n2,19,18,1.0,3.0\n"
        )
    prepare(cfg, root / data_dir(cfg.scale))
    return files


def test_report_stage_writes_the_page_and_logs_it(project):  # noqa: F811
    cfg = load_config(scale="tiny")
    files = _outputs(project, cfg)
    client = mlflow.MlflowClient()
    run_id = client.search_runs(
        [mlflow.get_experiment_by_name("ddpm-repro").experiment_id],
        "tags.`ddpm.variant` = 'eps_fixed_mse'",
    )[0].info.run_id
    for step, value in ((2, 1.0), (4, 0.5), (8, 0.25)):
        client.log_metric(run_id, "loss", value, step=step)
    report.main(["--scale", "tiny"])
    text = (project / "reports" / "index.html").read_text()
    embedded = [base64.b64decode(b) for b in IMG.findall(text)]
    for name, pngs in files.items():  # every variant's figures, as they are on disk
        for file, data in pngs.items():
            assert data in embedded, (name, file)
    real = [d for d in embedded if Image.open(io.BytesIO(d)).size == (2 + 4 * 34, 2 + 4 * 34)]
    assert len(real) == len(cfg.variants)  # beside each variant: 16 real 8x8 images, 4 x 4
    for n in (1, 2, 4):  # the tables, with their notes
        assert f"Table {n}:" in text
    assert text.count("<table>") == 3 and STAND_IN_NOTE in text
    assert "Training loss" in text and "Fig. 5: distortion" in text
    assert "not produced" not in text
    parent = mlflow.search_runs(
        experiment_names=["ddpm-repro"], filter_string="tags.`ddpm.role` = 'reproduction'"
    )
    artifacts = {a.path for a in client.list_artifacts(parent["run_id"].iloc[0])}
    assert "index.html" in artifacts


def test_a_rerun_of_the_report_updates_its_parent_run(project):  # noqa: F811
    report.main(["--scale", "tiny"])
    first = mlflow.search_runs(experiment_names=["ddpm-repro"], filter_string=REPRODUCTION)
    report.main(["--scale", "tiny"])
    again = mlflow.search_runs(experiment_names=["ddpm-repro"], filter_string=REPRODUCTION)
    assert list(again["run_id"]) == list(first["run_id"])  # one parent, not one per rerun
    experiment = mlflow.get_experiment_by_name("ddpm-repro").experiment_id
    link = f"/#/experiments/{experiment}/runs?workflowType=machine_learning"
    assert tracking.ui_link(load_config(scale="tiny"), experiment).endswith(link)


CHECK = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const r = {images: imgs.length, loaded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
             tables: document.querySelectorAll('table').length,
             rows: document.querySelectorAll('tbody tr').length,
             text: document.body.innerText.length, height: document.body.scrollHeight};
  document.body.setAttribute('data-check', JSON.stringify(r));
});
</script>"""


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("no chromium: apt-get install -y chromium (.ci/run installs it)")
    return found


def render(browser: str, path, *extra: str, budget_ms: int = 5000) -> subprocess.CompletedProcess:
    """Headless Chromium on ``path`` (anything with .as_uri()), with flags ``extra``."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    flags += ["--no-first-run", "--disable-extensions", f"--virtual-time-budget={budget_ms}"]
    return subprocess.run(
        [browser, *flags, *extra, path.as_uri()], capture_output=True, text=True, timeout=120
    )


def test_the_page_in_a_real_browser(tmp_path):
    """Headless Chromium: the page is not blank, every image decodes, the tables are there."""
    import json

    browser = chromium()
    text = html.render_page(_page())
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", CHECK + "</body>"))
    done = render(browser, probe, "--dump-dom")
    found = re.search(r"data-check=\"([^\"]*)\"", done.stdout)
    assert found, done.stderr[-2000:]
    result = json.loads(found.group(1).replace("&quot;", '"'))
    assert result["images"] == 3 and result["loaded"] == 3, result
    assert result["tables"] == 1 and result["rows"] == 1
    assert result["text"] > 200 and result["height"] > 500, result
    broken = tmp_path / "broken.html"  # the check sees an image that does not decode
    broken.write_text(probe.read_text().replace(IMG.findall(text)[0], "iVBORw0KGgoAAAA", 1))
    found = re.search(r"data-check=\"([^\"]*)\"", render(browser, broken, "--dump-dom").stdout)
    assert json.loads(found.group(1).replace("&quot;", '"'))["loaded"] == 2
    shot = tmp_path / "shot.png"
    render(browser, probe, f"--screenshot={shot}", "--window-size=1280,900")
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (900, 1280)
    assert (pixels != 255).any(axis=2).mean() > 0.01  # not a blank, white page

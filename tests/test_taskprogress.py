"""Progress of Ray block tasks: image-steps counted in the task, fed to the driver's display."""

from __future__ import annotations

import io
import sys

import numpy as np
import ray
import ray.cloudpickle
import torch

from pipeline.cluster import taskprogress
from pipeline.cluster.gputasks import submit
from pipeline.cluster.taskprogress import BlockProgress
from pipeline.sampling.noise import ImageNoise

# Ray workers cannot import this test module: ship its task functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def five_steps_of_eight_images() -> int:
    """What a sampling block does to its noise source: 8 images, 5 steps."""
    noise = ImageNoise(0, range(8))
    for _ in range(5):
        noise((8, 1, 2, 2))
    return torch.get_num_threads()


def test_a_task_reports_its_image_steps_to_the_driver(ray_session, monkeypatch):
    monkeypatch.setattr(taskprogress, "MIN_IMAGE_STEPS", 0)
    out = io.StringIO()
    progress = BlockProgress(16, 8, "samples", steps_per_item=10, stream=out)
    try:
        handle = progress.handle((8, 16))
        ray.get(submit(five_steps_of_eight_images, resources={"num_cpus": 1}, progress=handle))
        progress.poll()
        assert progress.partial == {(8, 16): 4.0}  # 40 image-steps of 10 per sample
        assert progress.current() == 12.0
        progress.finished((8, 16), 8)
        assert progress.partial == {} and progress.current() == 16
    finally:
        progress.close()
    [line] = out.getvalue().splitlines()
    assert line.startswith("samples: 16/16 (100.0%) ") and "samples/s ETA " in line


def test_lines_for_logs_with_rate_and_eta(monkeypatch):
    monkeypatch.setattr(taskprogress, "LINE_EVERY_S", 0.0)
    out = io.StringIO()
    progress = BlockProgress(100, 0, "images", stream=out)
    assert progress.handle((0, 10)) is None  # no partial progress asked: no board
    assert BlockProgress(100, 0, "images", steps_per_item=999).handle((0, 10)) is None  # small
    progress.started -= 10.0  # as if the first block took 10 s
    progress.finished((0, 10), 10)
    progress.close()
    [line] = out.getvalue().splitlines()
    assert line.startswith("images: 10/100 (10.0%) 1.00 images/s ETA 1m3")  # ~90 s left


def test_advance_outside_a_task_is_a_no_op():
    taskprogress.advance(5)
    assert taskprogress._current is None


def test_figure_progress_total_counts_every_noise_draw(monkeypatch):
    from eval_project import tiny_unet

    from pipeline.evaluation.reconstruction import FigureSpec, figure_arrays
    from pipeline.model.diffusion import GaussianDiffusion, linear_beta_schedule

    counted = []
    monkeypatch.setattr(taskprogress, "advance", counted.append)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    spec = FigureSpec(images[:2], (2, 5), 3, images[2:3], images[3:4], 4, 3, seed=0)
    diffusion = GaussianDiffusion(linear_beta_schedule(5, 0.01, 0.3), "eps", "fixedlarge", "mse")
    figure_arrays(tiny_unet(), diffusion, spec)
    assert sum(counted) == spec.image_steps() == (2 + 6 * 1) + (2 + 6 * 4) + (2 + 3 * 3)


def test_work_in_this_process_advances_the_lines(monkeypatch):
    monkeypatch.setattr(taskprogress, "LINE_EVERY_S", 0.0)
    out = io.StringIO()
    progress = BlockProgress(4, 0, "Inception (w, cpu)", stream=out, unit="images")
    progress.started -= 20.0  # as if the first two images took 20 s
    progress.advance(2)
    progress.advance(2)
    progress.close()
    first, last = out.getvalue().splitlines()
    assert first.startswith("Inception (w, cpu): 2/4 (50.0%) 0.10 images/s ETA 20s")
    assert last.startswith("Inception (w, cpu): 4/4 (100.0%) ")

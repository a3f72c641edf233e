"""Connecting to Ray: an existing cluster when an address is known, else a local one.

RAY_ADDRESS (set by ``ray job submit`` drivers and by users) wins over params' ``ray.address``.
A bare ``ray.init(num_cpus=...)`` fails inside job drivers, so a new local instance is always
asked for explicitly with ``address="local"``.
"""

from __future__ import annotations

import logging
import os

import ray

from pipeline.config import RayConfig


def ray_address(cfg: RayConfig) -> str | None:
    """The cluster to join, or None for a new local one."""
    return os.environ.get("RAY_ADDRESS") or cfg.address


def init_ray(cfg: RayConfig) -> None:
    """Initialise Ray once per process (a no-op when already initialised)."""
    if ray.is_initialized():
        return
    common = {
        "log_to_driver": cfg.log_to_driver,
        "logging_level": logging.WARNING,
        "configure_logging": True,
    }
    address = ray_address(cfg)
    if address:
        ray.init(address=address, **common)
    else:
        ray.init(address="local", num_cpus=cfg.num_cpus, **common)

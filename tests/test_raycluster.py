"""pipeline.cluster.raycluster's helpers that need no cluster."""

from __future__ import annotations

import socket

from pipeline.cluster.raycluster import free_ports


def test_free_ports_are_distinct_and_bindable():
    """A private head gets its GCS, dashboard, agent and client ports at once: never the same
    port twice (Ray refuses to start then), and each one free to bind."""
    ports = free_ports(64)
    assert len(set(ports)) == 64
    for port in ports[:8]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))

"""Beyond one machine: batch screening and whole fields on a Ray cluster (the optional `[scale]` extra).
`import ray` happens only in this package, and nothing in the one-machine path imports it."""

from __future__ import annotations

from .jobs import LOST, RayUnavailable, analyze_fields_ray, connect, list_sources, predict_ray

__all__ = ["LOST", "RayUnavailable", "analyze_fields_ray", "connect", "list_sources", "predict_ray"]

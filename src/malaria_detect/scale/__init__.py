"""Beyond one machine: batch screening and whole fields on a Ray cluster (the optional `[scale]` extra).
`import ray` happens only in this package, and nothing in the one-machine path imports it."""

from __future__ import annotations

from .cluster import RayUnavailable, connect, list_sources
from .jobs import LOST, analyze_fields_ray, predict_ray

__all__ = ["LOST", "RayUnavailable", "analyze_fields_ray", "connect", "list_sources", "predict_ray"]

"""Launchers: where a validated spec runs (embedded local Ray, or a cluster via the Jobs API)."""

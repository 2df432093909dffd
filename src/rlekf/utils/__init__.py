"""Glue for the Hydra entry points (the only place besides train/eval that imports Hydra)."""

"""Helpers shared across the package: atomic file writes (``io``) and the entry points' environment
defaults (``env``), both without third-party imports, and the glue for the Hydra entry points
(``instantiate``, the only module here that imports Hydra).
"""

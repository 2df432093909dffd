"""Translations of rlekf models into other codes' formats (see :mod:`rlekf.interop.deepmd`)."""

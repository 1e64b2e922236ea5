"""Curated mutants: small breakages of the library, each with the tests that must fail under it.

See README.md in this folder; ``tests/test_mutants.py`` runs them all in CI.
"""

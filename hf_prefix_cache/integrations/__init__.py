"""Integrations with libraries built on transformers; each module imports its library, so import it by name."""

"""Bridges between fewflow and other libraries (optional dependencies, imported lazily)."""

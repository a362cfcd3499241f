"""The version, written once: the package, the wire's ``hello`` and pyproject all read it here."""

__version__ = "0.3.0"

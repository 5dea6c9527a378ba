"""The package version: the one place it is written (``pyproject.toml`` reads it from here).

A plain constant rather than an ``importlib.metadata`` lookup, which would cost the daemon about
2 MB of resident memory (issue 5's idle figure) for a string it shows in its state and metrics.
"""

__version__ = "0.1.0"

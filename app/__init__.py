"""gzx: Bayesian crowd aggregation for citizen science (Galaxy Zoo Express style)."""

__version__ = "0.1.0"

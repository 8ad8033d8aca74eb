"""Synthetic data sets with known causal graphs (e.g. :mod:`synthetic_data.pendulum`)."""

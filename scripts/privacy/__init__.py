"""Differential privacy for the bundle's DP stages, laid out as Opacus is.

- :mod:`~scripts.privacy.accounting`: epsilon of a run, composition of stages, noise calibration, calculator CLI;
- :mod:`~scripts.privacy.per_sample`: per-unit clipped gradient sums;
"""

"""Differential privacy for the bundle's DP stages, laid out as Opacus lays out its own.

- :mod:`~scripts.privacy.units`: privacy units as a dataset, Poisson samplers (single and multi-process), sample rate;
- :mod:`~scripts.privacy.unit_losses`: the loss of one unit in each DP stage (draws from a private generator);
- :mod:`~scripts.privacy.clipping`: the shared clipping rule (modes, bound C, clip factor), a leaf module;
- :mod:`~scripts.privacy.per_sample`: per-unit clipped gradient sums (``loop``, ``vmap``, ``bookkeeping``, ``auto``);
- :mod:`~scripts.privacy.unit_clipper`: resolves ``auto`` after the fine-tune scope and checks book-keeping once
  per batch signature, falling back to ``loop``/``vmap``;
- :mod:`~scripts.privacy.bookkeeping` and :mod:`~scripts.privacy.grad_norms`: book-keeping clipping, per-layer rules;
- :mod:`~scripts.privacy.optimizers`: Opacus's DP optimisers fed with per-unit clipped sums;
- :mod:`~scripts.privacy.ledger`: the privacy ledger (an Opacus accountant with composition, budget, write-ahead
  file and report), usable without any network;
- :mod:`~scripts.privacy.handler`: the Ignite handler that makes a MONAI trainer's step a DP-SGD step;
- :mod:`~scripts.privacy.validation`: network, scope and handler checks;
- :mod:`~scripts.privacy.accounting`: epsilon, composition, noise calibration, and the calculator
  (``python -m scripts.privacy``).
"""

"""Developer tools around the bundle, not part of it: ``make demo`` and ``make pretrain``.

The Model Zoo archive (``scripts/release.py``) holds ``configs/``, ``scripts/`` and ``docs/`` only;
these modules drive the bundle's commands on the embedded phantom data and ship the demo's public
pre-trained weights (``models/demo/``), so a downloaded bundle does not need them.

    python -m tools.demo [--pretrain_only]     # make demo / make pretrain
    python -m tools.summary demo | times | checks
    python -m tools.pretrained ship | install
"""

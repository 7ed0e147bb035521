"""Differentially private, attribute-controlled 3D cardiac MRI latent diffusion bundle.

The package holds only what MONAI, Opacus, Ignite and MLflow lack; the bundle configs in
``configs/`` declare the pipelines and reference these modules.
"""

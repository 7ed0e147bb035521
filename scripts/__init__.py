"""Differentially private, attribute-controlled 3D cardiac MRI latent diffusion bundle.

The package holds only what MONAI, Opacus, Ignite and MLflow lack; the bundle configs in
``configs/`` declare the pipelines and reference these modules.

Importing the package (every bundle config does) installs :func:`scripts.errors.excepthook`:
an uncaught error of the bundle's own (:class:`scripts.errors.BundleError`) is reported in a
few lines that end with the message, instead of MONAI's nested tracebacks; any other
exception keeps Python's full traceback.
"""

from scripts.errors import install_excepthook

install_excepthook()

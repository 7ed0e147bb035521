"""Synthesis: attribute-conditioned volumes from the DP fine-tuned model (``configs/inference.yaml``).

    python -m monai.bundle run inference --config_file "['configs/common.yaml','configs/inference.yaml']" \\
        --attributes_csv FILE --output_dir DIR
    python -m monai.bundle run sweep --config_file "['configs/common.yaml','configs/inference.yaml']" --attribute LVEDV

Modules: :mod:`.requests` (the request table), :mod:`.generator` (loading the networks, the
sampler), :mod:`.provenance` (what each image records, the privacy guarantee that covers it),
:mod:`.outputs` (the files a run writes), :mod:`.sweep` (one attribute varied). Every sample has
its own random streams (:func:`scripts.sampling.sample_latents` with ``seeds``), so a seed always
gives the same volume whatever the batch it is generated in.
"""

from scripts.synthesis.generator import (
    AUTOENCODER_STAGE,
    DP_STAGE,
    Generator,
    GeneratorFiles,
    Synthesizer,
    load_generator,
    load_matching_autoencoder,
    load_model,
    resolve_autoencoder_path,
)
from scripts.synthesis.outputs import (
    CARD_FILES,
    MANIFEST,
    PREVIEW,
    check_output_dir,
    nifti_affine,
    prepare_output_dir,
    previous_run_files,
    run_inference,
    save_nifti,
    write_manifest,
)
from scripts.synthesis.provenance import ATTRIBUTES_NOTE, PUBLIC_NOTE, bundle_version, make_provenance, privacy_info
from scripts.synthesis.requests import CLIP_HINT, MAX_SEED, Request, SampleSpec, plan_samples, read_requests
from scripts.synthesis.sweep import Sweep, SweepPlan, SweepSettings, check_sweep_output, sweep_base, sweep_values

__all__ = [
    "ATTRIBUTES_NOTE",
    "AUTOENCODER_STAGE",
    "CARD_FILES",
    "CLIP_HINT",
    "DP_STAGE",
    "MANIFEST",
    "MAX_SEED",
    "PREVIEW",
    "PUBLIC_NOTE",
    "Generator",
    "GeneratorFiles",
    "Request",
    "SampleSpec",
    "Sweep",
    "SweepPlan",
    "SweepSettings",
    "Synthesizer",
    "bundle_version",
    "check_output_dir",
    "check_sweep_output",
    "load_generator",
    "load_matching_autoencoder",
    "load_model",
    "make_provenance",
    "nifti_affine",
    "plan_samples",
    "prepare_output_dir",
    "previous_run_files",
    "privacy_info",
    "read_requests",
    "resolve_autoencoder_path",
    "run_inference",
    "save_nifti",
    "sweep_base",
    "sweep_values",
    "write_manifest",
]

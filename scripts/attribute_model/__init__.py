"""A differentially private model of the private cohort's subject-level attribute table.

    python -m monai.bundle run training --config_file "['configs/common.yaml','configs/dp_attributes.yaml']"
    python -m scripts.attribute_model sample --model models/attributes_dp.json --subjects N --out FILE.csv

The model is a Gaussian copula (:mod:`.mechanism`): noisy per-column histograms (their missing bin
gives the missing rate) and a noisy second-moment matrix of the normal scores, both Gaussian
mechanisms with stated L2 sensitivities, recorded in the privacy ledger as one Gaussian step with
q = 1 (docs/attributes.md). :mod:`.model` holds the released parameters, :mod:`.sample` draws
subjects from them, :mod:`.stage` runs the DP stage and :mod:`.card` writes the cohort card.
"""

from scripts.attribute_model.model import AttributeModel, read_model
from scripts.attribute_model.table import SUBJECT_COLUMNS, SubjectTable

__all__ = ["AttributeModel", "SUBJECT_COLUMNS", "SubjectTable", "read_model"]

"""``python -m scripts.privacy epsilon|noise ...``: the privacy calculator (see :mod:`scripts.privacy.accounting`)."""

import sys

from scripts.privacy.accounting import main

sys.exit(main())

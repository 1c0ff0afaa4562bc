"""Hypothesis settings for the fuzz targets (tests/security/test_fuzz_*.py).

Profile "ci" (the default): 200 examples per target, derandomized so that a failure in CI is
reproduced by running the same test again, no deadline (CI machines are slow and uneven), no
example database left in the work tree. Profile "long" (``bin/fuzz``): random, as many
examples as ``MAILROOM_FUZZ_EXAMPLES`` says, failures saved in ``.hypothesis/`` to be replayed.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

CI_EXAMPLES = 200
_SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

settings.register_profile(
    "ci",
    max_examples=CI_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=_SLOW,
)
settings.register_profile(
    "long",
    max_examples=int(os.environ.get("MAILROOM_FUZZ_EXAMPLES", "100000")),
    deadline=None,
    derandomize=False,
    print_blob=True,
    suppress_health_check=_SLOW,
)
settings.load_profile(
    os.environ.get(
        "MAILROOM_FUZZ_PROFILE", "long" if "MAILROOM_FUZZ_EXAMPLES" in os.environ else "ci"
    )
)

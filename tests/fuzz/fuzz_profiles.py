"""How many examples each fuzz test runs.

``make test`` runs a few hundred per test, derandomized (the same examples every run, so a
failure reproduces). ``make fuzz`` (and ``make chaos``) set ``HYPOTHESIS_PROFILE=chaos``: 10,000
examples per test with a fresh seed each run (hypothesis prints the failing example and the
``@reproduce_failure`` blob). ``HMS_FUZZ_EXAMPLES=N`` overrides the count in either profile.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

CHAOS_EXAMPLES = 10_000
_COMMON = {
    "deadline": None,  # a shared 2-core machine: timing is not what these tests check
    "database": None,  # nothing written into the checkout; the printed example reproduces it
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                              HealthCheck.data_too_large, HealthCheck.filter_too_much],
}
settings.register_profile("hms-fuzz", derandomize=True, **_COMMON)
settings.register_profile("chaos", derandomize=False, print_blob=True, **_COMMON)

PROFILE = "chaos" if os.environ.get("HYPOTHESIS_PROFILE") == "chaos" else "hms-fuzz"


def fuzz(default_examples: int, *, chaos_examples: int = CHAOS_EXAMPLES) -> settings:
    """Settings for one fuzz test: ``default_examples`` in ``make test``, ``chaos_examples`` in
    the chaos profile, ``HMS_FUZZ_EXAMPLES`` when set."""
    n = default_examples if PROFILE != "chaos" else chaos_examples
    if os.environ.get("HMS_FUZZ_EXAMPLES"):
        n = int(os.environ["HMS_FUZZ_EXAMPLES"])
    return settings(settings.get_profile(PROFILE), max_examples=n)

"""
Property-based tests (hypothesis): the config loader, the router, the
load-balancing policies and the header rewriting hold their promises for
generated inputs, not only for the examples written down elsewhere.

Example counts are modest so that the whole package runs in seconds; set
C{HYPOTHESIS_PROFILE=thorough} for a longer search.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "balance",
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("thorough", max_examples=5000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "balance"))

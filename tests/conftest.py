"""Shared test configuration.

Real Redis for tests (the machine's, private servers, a cluster) comes from the
``redis_harness`` plugin: fixtures ``machine_redis_url``, ``redis_servers``, ``redis_cluster``
and the skip-or-fail policy with its one summary line (``CI=true`` turns skips into failures).
"""

from __future__ import annotations

pytest_plugins = ["redis_harness"]

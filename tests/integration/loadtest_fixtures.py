"""Shared parts of the tests of the load-test tooling (``test_loadtest_runner``,
``test_loadtest_budgets_and_faults``, ``test_loadtest_benchmarks``): the checkout's root, where
``python -m loadtests.*`` runs, and an environment without the caller's ``MSFLOW_`` and
``LOCUST_`` settings. Test modules import this, never each other.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MSFLOW_", "LOCUST_"))}
    env.update(extra)
    return env

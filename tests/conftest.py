"""Test-wide setup. JAX reads XLA_FLAGS once, at import: set 4 CPU devices before anything
imports it, and keep JAX on the CPU so it never probes for accelerators or cloud metadata."""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

"""Simulated CPU devices for the pmap/shard_map tests; must run before jax is imported."""

import os

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"

if _DEVICE_COUNT_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + f" {_DEVICE_COUNT_FLAG}=8").strip()

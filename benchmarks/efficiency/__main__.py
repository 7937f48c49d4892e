"""``python -m benchmarks.efficiency``: DDP-Adam vs DiLoCo vs APTS communication to target
(``.efficiency``); 8 simulated host devices unless ``XLA_FLAGS`` sets a count."""
from benchmarks.common.devices import simulate_host_devices

simulate_host_devices(8)   # before jax starts

from benchmarks.efficiency import efficiency  # noqa: E402  (after the device count on purpose)

efficiency.main()

"""The simulated device: a libarms 5.33 SA over real TLS, for tests, benchmarks and the quick start.

Three faces of one device, and the command that runs them together:

* ``client``: the SA as a client (pulls, done-requests), judging every answer as strictly as
  the SA does: SimulatedSA.
* ``listener``: the SA's https-simple listener, which armsproxy pushes to: SimulatedDevice.
* ``tunnel``: the SA's https-tunnels: SimulatedTunnelDevice.
* ``serve``: ``armsproxy-sasim serve``, a device that pulls, confirms and serves pushes until
  stopped: DeviceServer.

It uses nothing of the proxy's code (tests/test_device_isolation.py checks it): a proxy that
passes against this device but not against a real one means the device is wrong, and sharing
code would hide that. Import from here; the modules' other names are the device's insides.
"""

from .client import (
    UPSTREAM_TLS_VERSION,
    DeviceVerdict,
    SAExchange,
    SimulatedSA,
    judge_response,
    parse_url,
)
from .listener import DeviceBehaviour, DeviceModule, SimulatedDevice
from .serve import DeviceServer, ServeSettings
from .tunnel import SimulatedTunnelDevice, TunnelBehaviour, build_open_request

__all__ = [
    "UPSTREAM_TLS_VERSION",
    "DeviceBehaviour",
    "DeviceModule",
    "DeviceServer",
    "DeviceVerdict",
    "SAExchange",
    "ServeSettings",
    "SimulatedDevice",
    "SimulatedSA",
    "SimulatedTunnelDevice",
    "TunnelBehaviour",
    "build_open_request",
    "judge_response",
    "parse_url",
]

"""Running compiled artifacts on a target device: this machine, a board over ssh, a phone over adb.

Modules:
    transport  Transport (push files, run an argv, clean up) for local, ssh://user@host[:port] and adb[://SERIAL]
    runner     measure(artifact_dir, device) -> latency JSON from the artifact's standalone `canao-run`
    command    `canao device measure`

The transports know nothing about models: a later artifact kind (a decoder's `canao-run --bench-decode`)
uses the same push/run/cleanup.
"""

from .device_runner import measure
from .transport import Transport, open_transport

__all__ = ["measure", "Transport", "open_transport"]

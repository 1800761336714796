"""Small networking helpers shared by the services: free ports, and torch.distributed rendezvous stores and
gloo transports that listen on the configured interface only.

torch's own tcp:// and env:// rendezvous start the store server on every interface (`*:port`), whatever
host the URL names; a TCPStore given a socket we bound ourselves (master_listen_fd) listens where we bound
it. Gloo's transport listens on the address its device resolves (the host name's, unless
GLOO_SOCKET_IFNAME names an interface), so we name the interface that holds the configured address.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import socket
import struct
from datetime import timedelta

log = logging.getLogger(__name__)

_SIOCGIFADDR = 0x8915


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now (for a rendezvous or a server the caller starts next)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def interface_of(address: str) -> str | None:
    """The name of the network interface holding IPv4 `address` ('lo' for 127.0.0.1), or None."""
    try:
        want = socket.inet_aton(socket.gethostbyname(address))
    except OSError:
        return None
    if want[0] == 127:
        want = socket.inet_aton("127.0.0.1")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # an interface without an IPv4 address
                continue
            if raw[20:24] == want:
                return name
    return None


def pin_gloo_interface(address: str) -> None:
    """Make gloo groups created from now on in this process listen on the interface holding `address`
    (unless the user chose one with GLOO_SOCKET_IFNAME, or `address` means every interface)."""
    if "GLOO_SOCKET_IFNAME" in os.environ or address in ("", "0.0.0.0", "::"):
        return
    name = interface_of(address)
    if name is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = name


def tcp_store(host: str, port: int, world_size: int, is_master: bool, timeout: timedelta | float,
              bind: str | None = None):
    """A torch TCPStore at host:port. The master's server listens on `bind` (default `host`) only; `host` is
    the address the others connect to, which behind NAT or a Kubernetes Service is not a local interface."""
    from torch.distributed import TCPStore

    if not isinstance(timeout, timedelta):
        timeout = timedelta(seconds=float(timeout))
    if not is_master:
        return TCPStore(host, port, world_size, False, timeout)
    bind = host if bind is None else bind
    anywhere = bind in ("", "0.0.0.0", "::")
    sock = socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("" if anywhere else bind, port))
        sock.listen(1024)
        port = sock.getsockname()[1]
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {bind}:{port} for the torch.distributed store: {e}") from None
    # the store owns the descriptor from here (detach: Python must not close it under the store); the master
    # reaches its own server through the address it listens on
    return TCPStore("127.0.0.1" if anywhere else bind, port, world_size, True, timeout, master_listen_fd=sock.detach())

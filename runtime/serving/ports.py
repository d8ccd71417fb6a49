"""Who may listen on the server's port: the exclusive-port check and the shared-port reservation.

gRPC can set SO_REUSEPORT on its listening sockets; two processes that both set it (same user)
share a port silently and the kernel splits connections between them, even when they serve
different bundles. `uwrt serve` therefore never relies on gRPC's default:

* one process (`workers = 1`): gRPC binds with SO_REUSEPORT off, and `check_free` tries a plain
  bind first (before the bundle is loaded) so an occupied port fails start-up in milliseconds with
  `PortUnavailable` naming the address;
* several processes (`workers > 1`): the supervisor runs the same check, then `reserve`s the port:
  it keeps a socket bound with SO_REUSEPORT (and without SO_REUSEADDR), never listening, for its
  whole life. The workers' gRPC listeners (SO_REUSEPORT on) join it; any other server that binds
  without SO_REUSEPORT (a second `uwrt serve`, any program) gets EADDRINUSE, also while every worker
  is down for a restart, and a non-listening socket is never handed connections. Port 0 becomes
  a concrete free port here, before any worker starts.

Processes of the same user that set SO_REUSEPORT themselves can still join a shared port (the
kernel's rule); the supervisor's bundle-digest check covers its own workers.

Thread safety: plain functions; a Reservation belongs to the thread that made it.
"""
from __future__ import annotations

import errno
import socket
from dataclasses import dataclass, field

__all__ = ["PortUnavailable", "Reservation", "check_free", "reserve", "format_address"]


class PortUnavailable(RuntimeError):
    """The address cannot be listened on (in use, or not bindable); the message says what to do."""


def format_address(host: str, port: int) -> str:
    """host:port as gRPC and the logs write it ([v6]:port for IPv6 literals)."""
    h = host.strip("[]")
    return f"[{h}]:{port}" if ":" in h else f"{h}:{port}"


def _addresses(host: str, port: int) -> list[tuple[int, tuple]]:
    """(family, sockaddr) for every address `host` resolves to, as gRPC would listen on them."""
    h = host.strip("[]")
    try:
        infos = socket.getaddrinfo(h or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise PortUnavailable(f"cannot listen on {format_address(host, port)}: the host does not resolve ({e})") \
            from None
    out: list[tuple[int, tuple]] = []
    for fam, _, _, _, addr in infos:
        if fam in (socket.AF_INET, socket.AF_INET6) and (fam, addr) not in out:
            out.append((fam, addr))
    return out


def _socket(fam: int, addr: tuple, *, reuseport: bool) -> socket.socket:
    s = socket.socket(fam, socket.SOCK_STREAM)
    try:
        if reuseport:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        else:        # as gRPC's own listeners: a port held only by TIME_WAIT connections is free
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6 and addr[0] == "::":
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)   # dual stack, as gRPC binds [::]
        s.bind(addr)
    except BaseException:
        s.close()
        raise
    return s


def _in_use(host: str, port: int, e: OSError) -> PortUnavailable:
    what = "in use (another server, perhaps another `uwrt serve`, listens there)" if e.errno == errno.EADDRINUSE \
        else f"not bindable ({e.strerror})"
    return PortUnavailable(f"cannot listen on {format_address(host, port)}: the address is {what}. Stop the other "
                           f"server or pick another --port (0 picks a free one); processes share a port only as "
                           f"the workers of one `uwrt serve --workers N`")


#: an address of `host` this machine cannot bind at all (e.g. ::1 without IPv6): skipped, as gRPC
#: does, as long as another address binds
_UNBINDABLE = (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT)


def _bind_all(host: str, port: int, *, reuseport: bool) -> list[socket.socket]:
    """Bind every address of `host` at `port` (0: the port the first address got); raises OSError."""
    socks: list[socket.socket] = []
    skipped: OSError | None = None
    try:
        for fam, addr in _addresses(host, port):
            if socks and port == 0:    # the other addresses of host at the port the first one got
                addr = (addr[0], socks[0].getsockname()[1], *addr[2:])
            try:
                socks.append(_socket(fam, addr, reuseport=reuseport))
            except OSError as e:
                if e.errno not in _UNBINDABLE:
                    raise
                skipped = e
        if not socks:
            raise skipped or OSError(errno.EADDRNOTAVAIL, "no IPv4/IPv6 address")
        return socks
    except BaseException:
        for s in socks:
            s.close()
        raise


def check_free(host: str, port: int) -> int:
    """Raise PortUnavailable unless a plain bind (SO_REUSEADDR, no SO_REUSEPORT) of every address
    of `host` at `port` succeeds; that bind conflicts with any listener, SO_REUSEPORT or not.
    Returns the port (a free one when `port` is 0). Nothing stays bound."""
    try:
        socks = _bind_all(host, port, reuseport=False)
    except OSError as e:
        raise _in_use(host, port, e) from None
    p = socks[0].getsockname()[1]
    for s in socks:
        s.close()
    return p


@dataclass
class Reservation:
    """The supervisor's claim on a shared port: bound with SO_REUSEPORT, never listening."""
    host: str
    port: int
    socks: list[socket.socket] = field(default_factory=list)

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)

    def close(self) -> None:
        for s in self.socks:
            s.close()
        self.socks.clear()


def reserve(host: str, port: int, *, attempts: int = 5) -> Reservation:
    """check_free, then hold the port (a concrete free port when `port` is 0) with SO_REUSEPORT
    sockets so only SO_REUSEPORT listeners of this user can join it. Raises PortUnavailable."""
    last: OSError | None = None
    for _ in range(attempts):      # retried only when port 0's pick is taken between the two binds
        p = check_free(host, port)
        try:
            return Reservation(host, p, _bind_all(host, p, reuseport=True))
        except OSError as e:
            last = e
            if port != 0:
                break
    assert last is not None
    raise _in_use(host, port, last)

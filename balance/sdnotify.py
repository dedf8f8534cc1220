"""
systemd's readiness protocol (sd_notify(3)) without libsystemd: one datagram
to the socket named by C{$NOTIFY_SOCKET}, when there is one.
"""

from __future__ import annotations

import os
import socket


def notify(state: str, environ=None) -> bool:
    """
    Tell the service manager about a state change, e.g. C{"READY=1"},
    C{"STOPPING=1"}, C{"RELOADING=1"} or C{"STATUS=..."}.

    :param state: newline-separated C{KEY=VALUE} assignments.
    :param environ: where to read C{NOTIFY_SOCKET} (the process environment
        by default).
    :return: whether a message was sent (False outside systemd).
    """
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        # An abstract-namespace socket.
        address = "\0" + address[1:]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.connect(address)
        sock.sendall(state.encode("utf-8"))
    except OSError:
        return False
    finally:
        sock.close()
    return True

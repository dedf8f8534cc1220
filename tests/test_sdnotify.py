"""Tests for L{balance.sdnotify}: messages arrive on a fake NOTIFY_SOCKET."""

import os
import socket

from twisted.trial import unittest

from balance.sdnotify import notify
from tests.helpers import unix_socket_path


class NotifyTests(unittest.TestCase):
    def listen(self) -> tuple[socket.socket, str]:
        path = unix_socket_path(self, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(5)
        self.addCleanup(sock.close)
        return sock, path

    def test_ready(self):
        """READY=1 reaches the socket systemd names."""
        sock, path = self.listen()
        self.assertTrue(notify("READY=1", {"NOTIFY_SOCKET": path}))
        self.assertEqual(sock.recv(100), b"READY=1")

    def test_abstract(self):
        """An abstract socket name (leading @) works too."""
        name = "balance-test-%d" % os.getpid()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind("\0" + name)
        sock.settimeout(5)
        self.addCleanup(sock.close)
        self.assertTrue(notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name}))
        self.assertEqual(sock.recv(100), b"STOPPING=1")

    def test_outsideSystemd(self):
        """Without NOTIFY_SOCKET nothing is sent."""
        self.assertFalse(notify("READY=1", {}))

    def test_deadSocket(self):
        """A socket that went away is not an error for Balance."""
        self.assertFalse(notify("READY=1", {"NOTIFY_SOCKET": "/nonexistent/notify"}))

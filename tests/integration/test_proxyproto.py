"""
The PROXY protocol with haproxy as the real peer on both sides:

  - haproxy with C{send-proxy} / C{send-proxy-v2} in front of Balance
    listeners with C{proxy_protocol: true} (http, tcp, TLS): Balance sees
    the original client, in X-Forwarded-For and in what it sends on;
  - haproxy with C{accept-proxy} behind Balance clusters with
    C{send_proxy_protocol: v1 | v2}: haproxy answers with the source
    address it read from Balance's header.

Clients connect from 127.0.0.2 (curl C{--interface}) while every proxy
connects from 127.0.0.1, so the address that arrives tells which one was
passed on.
"""

from __future__ import annotations

import os
import sys

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from balance.config.validate import load_config
from balance.service import build
from balance.tls.testing import CA
from tests.helpers import free_port, need_tool, port_open, wait_for

CLIENT_IP = "127.0.0.2"


class _Process(ProcessProtocol):
    def __init__(self):
        self.output = bytearray()
        self.ended = Deferred()

    def outReceived(self, data):
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason):
        self.ended.callback(isinstance(reason.value, (ProcessDone, ProcessTerminated)))


def start_haproxy(test, config: str, port: int) -> Deferred:
    """Run haproxy in the foreground on C{config}; stop it (by PID) after C{test}."""
    haproxy = need_tool("haproxy")
    path = test.mktemp() + ".cfg"
    with open(path, "w") as f:
        f.write(config)
    proto = _Process()
    transport = reactor.spawnProcess(proto, haproxy, [haproxy, "-db", "-f", path], env=os.environ)

    def stop():
        if transport.pid is not None:
            transport.signalProcess("KILL")
            return proto.ended

    test.addCleanup(stop)
    return wait_for(
        lambda: port_open(port) or transport.pid is None, 20, f"haproxy on {port}"
    ).addCallback(lambda _: proto)


GLOBAL = """\
global
    maxconn 100
defaults
    timeout connect 2s
    timeout client 10s
    timeout server 10s
"""


def haproxy_front(port: int, balance_port: int, send: str, mode: str = "tcp") -> str:
    """haproxy in front of Balance: a listener on C{port} passing the client with C{send}."""
    return GLOBAL + (
        f"frontend fe\n    mode {mode}\n    bind 127.0.0.1:{port}\n    default_backend be\n"
        f"backend be\n    mode {mode}\n    server balance 127.0.0.1:{balance_port} {send}\n"
    )


def haproxy_back(port: int) -> str:
    """haproxy behind Balance: reads a PROXY header and answers with the source it gave."""
    return GLOBAL + (
        f"frontend fe\n    mode http\n    bind 127.0.0.1:{port} accept-proxy\n"
        '    http-request return status 200 content-type text/plain '
        'lf-string "src=%[src] port=%[src_port] xff=%[req.hdr(x-forwarded-for)]\\n"\n'
    )


def curl(url: str, *extra: str) -> Deferred:
    path = need_tool("curl")
    d = getProcessOutputAndValue(
        path, ["-sS", "--max-time", "10", "--interface", CLIENT_IP, *extra, url], env=os.environ
    )
    return d.addCallback(lambda r: (r[0].decode(), r[1].decode(), r[2]))


class ProxyProtocolTests(unittest.TestCase):
    def run_balance(self, text: str):
        path = self.mktemp() + ".yaml"
        with open(path, "w") as f:
            f.write(text)
        root = build(load_config(path), reactor)
        root.privilegedStartService()
        root.startService()
        self.addCleanup(root.stopService)
        root._serving()
        return root

    @inlineCallbacks
    def test_http_listener_behind_haproxy(self):
        """
        haproxy (send-proxy-v2) -> Balance http listener (proxy_protocol) ->
        cluster (send_proxy_protocol: v1) -> haproxy (accept-proxy): the
        client's address arrives at the end, in Balance's PROXY header and
        in X-Forwarded-For, and not haproxy's or Balance's own.
        """
        front, listen, back = free_port(), free_port(), free_port()
        yield start_haproxy(self, haproxy_back(back), back)
        self.run_balance(
            f"""
listeners:
  - name: web
    listen: "tcp:{listen}:interface=127.0.0.1"
    protocol: http
    proxy_protocol: true
    cluster: back
clusters:
  - name: back
    send_proxy_protocol: v1
    backends: ["127.0.0.1:{back}"]
"""
        )
        yield start_haproxy(self, haproxy_front(front, listen, "send-proxy-v2"), front)
        out, err, code = yield curl(f"http://127.0.0.1:{front}/")
        self.assertEqual(code, 0, err)
        self.assertIn(f"src={CLIENT_IP} ", out)
        self.assertIn(f"xff={CLIENT_IP}\n", out)
        # A connection without a header is refused by Balance's listener.
        out, err, code = yield curl(f"http://127.0.0.1:{listen}/")
        self.assertNotEqual(code, 0)

    @inlineCallbacks
    def test_pooled_connections_per_client(self):
        """
        With send_proxy_protocol, an upstream connection carries only the
        requests of the client connection named in its header: two
        requests on one keep-alive client connection share one (same
        source port at haproxy), a second client gets its own.
        """
        listen, back = free_port(), free_port()
        yield start_haproxy(self, haproxy_back(back), back)
        self.run_balance(
            f"""
listeners:
  - name: web
    listen: "tcp:{listen}:interface=127.0.0.1"
    protocol: http
    cluster: back
clusters:
  - name: back
    send_proxy_protocol: v2
    backends: ["127.0.0.1:{back}"]
"""
        )
        url = f"http://127.0.0.1:{listen}/"
        out, err, code = yield curl(url, url)
        self.assertEqual(code, 0, err)
        lines = out.splitlines()
        self.assertEqual(len(lines), 2, out)
        # curl's one keep-alive connection: one source port, seen twice.
        self.assertEqual(lines[0], lines[1])
        self.assertTrue(lines[0].startswith(f"src={CLIENT_IP} "), lines[0])
        again, err, code = yield curl(url)
        self.assertNotEqual(again.strip(), lines[0])
        self.assertTrue(again.startswith(f"src={CLIENT_IP} "), again)

    @inlineCallbacks
    def test_h2_streams(self):
        """HTTP/2 streams of one client connection share its PROXY header upstream."""
        listen, back = free_port(), free_port()
        yield start_haproxy(self, haproxy_back(back), back)
        self.run_balance(
            f"""
listeners:
  - name: web
    listen: "tcp:{listen}:interface=127.0.0.1"
    protocol: http
    cluster: back
clusters:
  - name: back
    send_proxy_protocol: v1
    backends: ["127.0.0.1:{back}"]
"""
        )
        # (curl 7.88 cannot send a second h2c stream on one connection.)
        nghttp = need_tool("nghttp", "nghttp2-client")
        url = f"http://127.0.0.1:{listen}/"
        out, err, code = yield getProcessOutputAndValue(nghttp, [url, url + "?2"], env=os.environ)
        self.assertEqual(code, 0, err)
        lines = out.decode().splitlines()
        self.assertEqual(len(lines), 2, out)
        # One client connection, one header: the same source port twice.
        self.assertEqual(lines[0], lines[1])
        self.assertTrue(lines[0].startswith("src=127.0.0.1 "), lines[0])

    @inlineCallbacks
    def test_tcp_listener_v1_to_v2(self):
        """
        haproxy (send-proxy) -> Balance tcp listener (proxy_protocol) ->
        cluster (send_proxy_protocol: v2) -> haproxy (accept-proxy).
        """
        front, listen, back = free_port(), free_port(), free_port()
        yield start_haproxy(self, haproxy_back(back), back)
        self.run_balance(
            f"""
listeners:
  - name: raw
    listen: "tcp:{listen}:interface=127.0.0.1"
    protocol: tcp
    proxy_protocol: true
    cluster: back
clusters:
  - name: back
    send_proxy_protocol: v2
    backends: ["127.0.0.1:{back}"]
"""
        )
        yield start_haproxy(self, haproxy_front(front, listen, "send-proxy"), front)
        out, err, code = yield curl(f"http://127.0.0.1:{front}/")
        self.assertEqual(code, 0, err)
        self.assertIn(f"src={CLIENT_IP} ", out)

    @inlineCallbacks
    def test_tls_listener(self):
        """
        The header comes before the TLS ClientHello: haproxy (send-proxy-v2)
        -> Balance https listener -> whoami, which sees the client in
        X-Forwarded-For.
        """
        ca = CA()
        cert, key = ca.issue("localhost").write(self.mktemp(), "site")
        front, listen, upstream = free_port(), free_port(), free_port()
        self.run_balance(
            f"""
listeners:
  - name: web
    listen: "tcp:{listen}:interface=127.0.0.1"
    protocol: http
    proxy_protocol: true
    tls:
      certificates: [{{cert: "{cert}", key: "{key}"}}]
    cluster: who
clusters:
  - name: who
    backends: ["127.0.0.1:{upstream}"]
whoami:
  - {{name: alpha, listen: "tcp:{upstream}:interface=127.0.0.1"}}
"""
        )
        yield start_haproxy(self, haproxy_front(front, listen, "send-proxy-v2"), front)
        out, err, code = yield curl(f"https://localhost:{front}/", "-k")
        self.assertEqual(code, 0, err)
        self.assertIn(f"X-Forwarded-For: {CLIENT_IP}", out)


if sys.platform != "linux":  # pragma: no cover
    ProxyProtocolTests.skip = "needs the 127.0.0.0/8 loopback of Linux"

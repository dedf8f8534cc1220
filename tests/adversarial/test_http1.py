# -*- test-case-name: tests.adversarial.test_http1 -*-
"""
Request smuggling and malformed HTTP/1.1 against a real Balance listener:
raw bytes in, and both the client's answer and the backend's bytes checked.
"""

from __future__ import annotations

from tests.adversarial.support import AdversarialCase

POST = b"POST /p HTTP/1.1\r\nHost: a\r\n"
GET_SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"


class FramingTests(AdversarialCase):
    """CL.TE, TE.CL, TE.TE and friends: refused, or one request upstream."""

    async def test_cl_te(self):
        """Content-Length and Transfer-Encoding together: 400 whatever the order."""
        body = b"0\r\n\r\n" + GET_SMUGGLED
        for head in (
            b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n" % len(body),
            b"Transfer-Encoding: chunked\r\nContent-Length: %d\r\n" % len(body),
            b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n",
        ):
            await self.assert_refused(POST + head + b"\r\n" + body)

    async def test_te_cl(self):
        """TE.CL: a short Content-Length with a chunked body hiding a request."""
        smuggle = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(smuggle), smuggle)
        await self.assert_refused(
            POST + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n" + body
        )

    async def test_obfuscated_transfer_encoding_with_length(self):
        """
        Every obfuscation of Transfer-Encoding beside a Content-Length is
        refused: a backend reading either header alone would split it.
        """
        body = b"0\r\n\r\n" + GET_SMUGGLED
        for te in (
            b"Transfer-Encoding: chunked ,",
            b"Transfer-Encoding: xchunked",
            b"Transfer-Encoding: chunked\t",
            b"Transfer-Encoding:\tchunked",
            b"Transfer-Encoding:  chunked",
            b"Transfer-Encoding: identity, chunked",
            b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
            b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity",
            b"Transfer-Encoding: CHUNKED",
            b"Transfer-Encoding : chunked",
            b"Transfer-Encoding:\x0bchunked",
            b"Transfer-Encoding\x00: chunked",
        ):
            await self.assert_refused(
                POST + b"Content-Length: %d\r\n" % len(body) + te + b"\r\n\r\n" + body,
                statuses=(400, 501),
            )

    async def test_obfuscated_transfer_encoding_alone(self):
        """
        Without Content-Length, a Transfer-Encoding that still ends in
        chunked may pass, but upstream as exactly C{chunked}; anything else
        is refused.  Either way the body never becomes a second request.
        """
        chunked = b"5\r\nhello\r\n0\r\n\r\n"
        for te in (
            b"chunked ,",
            b"chunked\t",
            b" chunked",
            b"CHUNKED",
            b"identity, chunked",
            b"chunked, chunked",
            b"chunked\r\nTransfer-Encoding: chunked",
            b", chunked",
        ):
            await self.assert_refused_or_one(
                POST + b"Transfer-Encoding: " + te + b"\r\n\r\n" + chunked,
                body=b"hello",
                statuses=(400, 501),
            )
        for te in (b"xchunked", b"chunked, identity", b"chunkedx", b"chunked;q=1", b"gzip"):
            await self.assert_refused(
                POST + b"Transfer-Encoding: " + te + b"\r\n\r\n" + chunked + GET_SMUGGLED,
                statuses=(400, 501),
            )

    async def test_transfer_encoding_in_http10(self):
        """HTTP/1.0 has no chunked coding: refused rather than guessed."""
        await self.assert_refused(
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + GET_SMUGGLED
        )

    async def test_content_length_variants(self):
        """Duplicate, list, signed, hex, spaced and overflowing lengths: 400."""
        for cl in (
            b"Content-Length: 5\r\nContent-Length: 5",
            b"Content-Length: 5\r\nContent-Length: 6",
            b"Content-Length: 5, 5",
            b"Content-Length: 5,6",
            b"Content-Length: +5",
            b"Content-Length: -5",
            b"Content-Length: 0x5",
            b"Content-Length: 5.0",
            b"Content-Length: 5 5",
            b"Content-Length: 1_0",
            b"Content-Length: \xd9\xa5",
            b"Content-Length: 18446744073709551621",
            b"Content-Length: 99999999999999999999999999",
            b"Content-Length:",
        ):
            await self.assert_refused(POST + cl + b"\r\n\r\nhello" + GET_SMUGGLED)

    async def test_huge_content_length(self):
        """A well-formed length beyond max_body_bytes: 413, nothing upstream."""
        await self.assert_refused(
            POST + b"Content-Length: 1000000000000\r\n\r\nhello", statuses=(413,)
        )

    async def test_content_length_with_whitespace(self):
        """Optional whitespace around a length is not an ambiguity: one request."""
        request = await self.assert_one_request(
            POST + b"Content-Length:   5  \r\n\r\nhello", body=b"hello"
        )
        self.assertEqual([v.strip() for v in request.header_values(b"content-length")], [b"5"])

    async def test_chunk_sizes(self):
        """Overflowing, signed, prefixed or spaced chunk sizes: 400."""
        for chunk in (
            b"FFFFFFFFFFFFFFFFF5\r\nhello\r\n0\r\n\r\n",
            b"10000000000000005\r\nhello\r\n0\r\n\r\n",
            b"-5\r\nhello\r\n0\r\n\r\n",
            b"+5\r\nhello\r\n0\r\n\r\n",
            b"0x5\r\nhello\r\n0\r\n\r\n",
            b" 5\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX\r\n0\r\n\r\n",
            b"5\r\nhel\r\n0\r\n\r\n",
            b"g\r\nhello\r\n0\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhello\n0\r\n\r\n",
            b"5\rhello\r\n0\r\n\r\n",
            b"5;a=\x00\r\nhello\r\n0\r\n\r\n",
            b"5;a=b\nc\r\nhello\r\n0\r\n\r\n",
        ):
            self.new_backend_bytes()
            before = len(self.backend.requests())
            responses, raw, closed = await self.send(
                POST + b"Transfer-Encoding: chunked\r\n\r\n" + chunk + GET_SMUGGLED
            )
            # The head may have gone upstream before the bad chunk: what
            # matters is that no request completes there, and nothing of
            # the smuggled one arrives.
            self.assertEqual([r.status for r in responses if r.status >= 200], [400], chunk)
            self.assertTrue(closed, chunk)
            seen = self.new_backend_bytes()
            self.assertNotIn(b"smuggled", seen, chunk)
            self.assertEqual(len(self.backend.requests()), before, (chunk, seen))

    async def test_chunk_extensions(self):
        """Chunk extensions are parsed and dropped: one request, the body intact."""
        request = await self.assert_refused_or_one(
            POST
            + b"Transfer-Encoding: chunked\r\n\r\n"
            + b'5;name=value;quoted="a;b"\r\nhello\r\n0;last\r\n\r\n',
            body=b"hello",
        )
        self.assertIsNotNone(request)

    async def test_huge_chunk_extension(self):
        """A chunk extension longer than max_header_bytes is refused (431/400)."""
        before = len(self.backend.requests())
        responses, raw, closed = await self.send(
            POST
            + b"Transfer-Encoding: chunked\r\n\r\n5;"
            + b"x" * 300_000
            + b"\r\nhello\r\n0\r\n\r\n"
        )
        self.assertIn([r.status for r in responses], ([431], [400]), raw[:100])
        self.assertTrue(closed)
        self.assertEqual(len(self.backend.requests()), before)

    async def test_trailers_are_not_headers(self):
        """A trailer named Content-Length or Host never reaches the backend as a header."""
        request = await self.assert_refused_or_one(
            POST
            + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"
            + b"Content-Length: 50\r\nHost: evil\r\n\r\n",
            body=b"hello",
        )
        if request is not None:
            self.assertEqual(request.header_values(b"host"), [b"a"])


class SyntaxTests(AdversarialCase):
    """Malformed heads: refused, and never forwarded."""

    async def test_line_endings(self):
        """Bare LF and bare CR anywhere in the head: 400."""
        for data in (
            b"GET / HTTP/1.1\nHost: a\n\n",
            b"GET / HTTP/1.1\r\nHost: a\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n",
            b"GET / HTTP/1.1\rHost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\r\n",
            b"GET /\r HTTP/1.1\r\nHost: a\r\n\r\n",
        ):
            await self.assert_refused(data)

    async def test_obs_fold(self):
        """A folded header line (obs-fold): 400, never unfolded or passed on."""
        for fold in (b" ", b"\t"):
            await self.assert_refused(
                b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n"
                + fold
                + b"Transfer-Encoding: chunked\r\n\r\n"
            )
        await self.assert_refused(
            POST + b"Content-Length: 5\r\n Transfer-Encoding: chunked\r\n\r\nhello"
        )

    async def test_control_bytes(self):
        """NUL, DEL and other control bytes in names, values and targets: 400."""
        for line in (
            b"X: a\x00b",
            b"X: \x00",
            b"X: a\x01b",
            b"X: a\x1fb",
            b"X: a\x7fb",
            b"X\x00: a",
            b"X\x7f: a",
            b"X\x01Y: a",
            b"X Y: a",
            b'X"Y: a',
            b": a",
            b"\x00",
        ):
            await self.assert_refused(b"GET / HTTP/1.1\r\nHost: a\r\n" + line + b"\r\n\r\n")
        for target in (b"/\x00", b"/\x01", b"/\x7f", b"/a b", b"/a\tb", b"/\xff\x00"):
            await self.assert_refused(b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n")

    async def test_whitespace_before_colon(self):
        for line in (b"Host : b", b"Content-Length : 5", b"Content-Length\t: 5", b"X-A\t: b"):
            await self.assert_refused(b"POST / HTTP/1.1\r\nHost: a\r\n" + line + b"\r\n\r\nhello")

    async def test_whitespace_before_first_header(self):
        """A line starting with whitespace right after the request line: 400."""
        await self.assert_refused(b"GET / HTTP/1.1\r\n Host: a\r\n\r\n")
        await self.assert_refused(b"GET / HTTP/1.1\r\n\tX: b\r\nHost: a\r\n\r\n")

    async def test_methods(self):
        """Malformed or unknown methods: refused (400, 405 or 501)."""
        for method in (b"G(T", b"GET\x00", b"G ET", b"get", b"", b"GET\t", b"\x16\x03\x01"):
            await self.assert_refused(
                method + b" / HTTP/1.1\r\nHost: a\r\n\r\n", statuses=(400, 405, 501)
            )
        await self.assert_refused(
            b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", statuses=(400, 405)
        )

    async def test_versions(self):
        for version in (
            b"HTTP/1.2",
            b"HTTP/2.0",
            b"HTTP/3.0",
            b"HTTP/0.9",
            b"HTTP/1.10",
            b"HTTP/01.1",
            b"http/1.1",
            b"HTTP/1.1x",
            b"HTTP/1",
            b"HTTP/1.1 ",
            b"HTTP/ 1.1",
            b"HTTPS/1.1",
        ):
            await self.assert_refused(
                b"GET / " + version + b"\r\nHost: a\r\n\r\n", statuses=(400, 505)
            )
        # HTTP/0.9 (no version at all) is not answered with a body-less
        # response the client would take for the body.
        await self.assert_refused(b"GET /\r\n\r\n", statuses=(400, 505))

    async def test_host_header(self):
        """A missing, repeated or malformed Host: 400."""
        for head in (
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a@b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a:80:80\r\n\r\n",
        ):
            await self.assert_refused(head)

    async def test_overlong_request_line(self):
        """A target beyond max_header_bytes: 431 or 414, with or without its end."""
        await self.assert_refused(
            b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", statuses=(414, 431)
        )
        await self.assert_refused(b"GET /" + b"a" * 20000, statuses=(414, 431))

    async def test_overlong_head(self):
        """Many small fields or one big one beyond max_header_bytes: 431."""
        await self.assert_refused(
            b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: y\r\n" * 3000 + b"\r\n", statuses=(431,)
        )
        await self.assert_refused(
            b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"y" * 20000 + b"\r\n\r\n", statuses=(431,)
        )
        await self.assert_refused(
            b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X" * 20000 + b": y\r\n\r\n", statuses=(431,)
        )


class TargetTests(AdversarialCase):
    """Request-target forms."""

    async def test_absolute_form(self):
        """
        The authority of an absolute-form target wins over Host, and the
        backend gets origin-form with exactly one Host: the two never
        disagree on which site the request is for.
        """
        request = await self.assert_one_request(
            b"GET http://good.example/x?y HTTP/1.1\r\nHost: evil.example\r\n\r\n", target=b"/x?y"
        )
        self.assertEqual(request.header_values(b"host"), [b"good.example"])
        request = await self.assert_one_request(
            b"GET HTTP://good.example HTTP/1.1\r\nHost: good.example\r\n\r\n", target=b"/"
        )
        self.assertEqual(request.header_values(b"host"), [b"good.example"])

    async def test_bad_absolute_forms(self):
        """Userinfo, other schemes, empty authorities, fragments: 400."""
        for target in (
            b"http://user@evil/",
            b"http://user:pw@evil/",
            b"http:///x",
            b"http://",
            b"ftp://a/",
            b"javascript:alert(1)",
            b"http://a b/",
            b"/x#frag",
            b"http://a/#frag",
            b"a.example:80",
            b"http://a\\@evil/",
        ):
            await self.assert_refused(b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n")

    async def test_asterisk_form(self):
        """C{OPTIONS *} passes as is; C{*} with any other method is refused."""
        await self.assert_one_request(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", target=b"*")
        for method in (b"GET", b"POST", b"DELETE"):
            await self.assert_refused(method + b" * HTTP/1.1\r\nHost: a\r\n\r\n")


class HeaderAbuseTests(AdversarialCase):
    """Hop-by-hop abuse and forwarding headers from clients."""

    async def test_connection_cannot_drop_forwarding_headers(self):
        """
        C{Connection: x-forwarded-for} does not strip the address Balance
        adds: the backend still sees the real client last.
        """
        request = await self.assert_one_request(
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: x-forwarded-for, forwarded, via\r\n"
            b"X-Forwarded-For: 6.6.6.6\r\n\r\n"
        )
        [xff] = request.header_values(b"x-forwarded-for")
        self.assertEqual(xff.split(b",")[-1].strip(), b"127.0.0.1")
        self.assertEqual(len(request.header_values(b"forwarded")), 1)
        self.assertTrue(request.header(b"via").endswith(b"1.1 balance"))

    async def test_connection_cannot_drop_host(self):
        """C{Connection: close, host}: the backend still gets the Host (one)."""
        request = await self.assert_one_request(
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close, host\r\n\r\n"
        )
        self.assertEqual(request.header_values(b"host"), [b"a"])

    async def test_connection_cannot_drop_content_length(self):
        """
        C{Connection: content-length} must not unframe the body: without
        its Content-Length the backend would read the body as a request.
        """
        body = b"GET /inner HTTP/1.1\r\nHost: a\r\n\r\n"
        request = await self.assert_one_request(
            POST + b"Connection: content-length\r\nContent-Length: %d\r\n\r\n" % len(body) + body,
            body=body,
        )
        self.assertEqual(request.header_values(b"content-length"), [b"%d" % len(body)])

    async def test_connection_named_headers_dropped(self):
        """An ordinary field named in Connection is dropped, as RFC 9110 7.6.1 says."""
        request = await self.assert_one_request(
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, x-secret\r\n"
            b"X-Secret: 1\r\nKeep-Alive: 5\r\nProxy-Connection: x\r\nTE: gzip\r\n"
            b"Trailer: x\r\nUpgrade: h2c\r\nProxy-Authorization: basic x\r\n\r\n"
        )
        for name in (
            b"x-secret",
            b"keep-alive",
            b"proxy-connection",
            b"te",
            b"trailer",
            b"upgrade",
            b"proxy-authorization",
        ):
            self.assertIsNone(request.header(name), name)

    async def test_spoofed_forwarding_headers(self):
        """
        A client's X-Forwarded-For is kept in front, the real address last
        (so a backend taking the last hop cannot be fooled); its
        X-Forwarded-Proto and -Host are replaced; every one of them reaches
        the backend once.
        """
        request = await self.assert_one_request(
            b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 10.0.0.1\r\n"
            b"x-forwarded-for: 10.0.0.2, 10.0.0.3\r\nX-Forwarded-Proto: https\r\n"
            b"X-Forwarded-Host: admin.internal\r\nForwarded: for=10.0.0.9\r\n\r\n"
        )
        self.assertEqual(
            request.header_values(b"x-forwarded-for"), [b"10.0.0.1, 10.0.0.2, 10.0.0.3, 127.0.0.1"]
        )
        self.assertEqual(request.header_values(b"x-forwarded-proto"), [b"http"])
        self.assertEqual(request.header_values(b"x-forwarded-host"), [b"a"])
        [forwarded] = request.header_values(b"forwarded")
        self.assertTrue(forwarded.startswith(b"for=10.0.0.9, for=127.0.0.1"), forwarded)


class UpgradeTests(AdversarialCase):
    """Without WebSocket routes, an Upgrade never becomes a tunnel."""

    def answer(self, request, conn):
        if request.target == b"/switch":
            # A backend switching protocols although nobody asked.
            conn.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n"
                b"Upgrade: websocket\r\n\r\nTUNNEL-DATA"
            )
        else:
            conn.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async def test_upgrade_request_refused(self):
        """C{Upgrade: websocket} (and h2c) with C{Connection: upgrade}: no 101, no tunnel."""
        for up in (
            b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: x\r\nSec-WebSocket-Version: 13\r\n",
            b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n",
        ):
            self.new_backend_bytes()
            responses, raw, closed = await self.send(
                b"GET / HTTP/1.1\r\nHost: a\r\n" + up + b"\r\n" + GET_SMUGGLED
            )
            statuses = [r.status for r in responses]
            self.assertNotIn(101, statuses)
            seen = self.new_backend_bytes()
            if statuses[0] == 200:
                # h2c: served as a plain request, Upgrade stripped; what
                # followed was parsed as the next request (it carries
                # Balance's Via), never relayed raw.
                self.assertNotIn(b"upgrade", seen.lower())
                self.assertEqual(seen.count(b"Via: 1.1 balance"), seen.count(b" HTTP/1.1\r\n"))
            else:
                # websocket on a route without websocket: true: 400, and
                # nothing reaches the backend.
                self.assertEqual(statuses, [400])
                self.assertEqual(seen, b"")

    async def test_upgrade_without_connection_token(self):
        """C{Upgrade} alone is a hop-by-hop field: dropped, the request plain."""
        request = await self.assert_one_request(
            b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n"
        )
        self.assertIsNone(request.header(b"upgrade"))

    async def test_backend_101_not_tunnelled(self):
        """
        A backend answering 101 to a request that asked no upgrade: the
        client gets a 502, never the 101 nor the bytes after it, and what
        the client sends next is not relayed raw to the backend.
        """
        self.new_backend_bytes()
        responses, raw, closed = await self.send(
            b"GET /switch HTTP/1.1\r\nHost: a\r\n\r\n" + b"RAW-CLIENT-BYTES\r\n\r\n"
        )
        self.assertNotIn(b"101", raw.split(b"\r\n")[0])
        self.assertNotIn(b"TUNNEL-DATA", raw)
        self.assertNotIn(b"RAW-CLIENT-BYTES", self.new_backend_bytes())
        self.assertEqual([r.status for r in responses if r.status >= 200][:1], [502])

"""
The stapled OCSP response: read when it changes, checked, and dropped when
it expires.
"""

from __future__ import annotations

import os

from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from balance.tls.ocsp import OCSPStaple
from tests.tls.support import pki


class StapleTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        # The certificates were made "now", valid from a day before.
        self.clock.advance(pki()["ca"].cert.not_valid_before_utc.timestamp() + 86400)
        self.path = self.mktemp()
        self.events = []
        self.patch(OCSPStaple, "log", Logger(observer=self.events.append))
        self.staple = OCSPStaple(self.path, self.clock, "web")
        self.site = pki()["site_ec"]

    def write(self, der: bytes, mtime: int | None = None) -> bytes:
        with open(self.path, "wb") as f:
            f.write(der)
        if mtime is not None:
            os.utime(self.path, (mtime, mtime))
        return der

    def warnings(self):
        return [formatEvent(e) for e in self.events if e["log_level"] >= LogLevel.warn]

    def test_for_its_certificate_only(self):
        der = self.write(pki()["ca"].ocsp_response(self.site))
        self.assertTrue(self.staple.refresh())
        self.assertEqual(self.staple.response_for(self.site.cert.serial_number), der)
        self.assertEqual(self.staple.response_for(pki()["api"].cert.serial_number), b"")

    def test_reread_when_changed(self):
        """An unchanged file is not read again; a renewed one is."""
        self.write(pki()["ca"].ocsp_response(self.site), mtime=1000)
        self.staple.refresh()
        self.assertFalse(self.staple.refresh())
        newer = self.write(pki()["ca"].ocsp_response(self.site, hours=48), mtime=2000)
        self.assertTrue(self.staple.refresh())
        self.assertEqual(self.staple.response_for(self.site.cert.serial_number), newer)

    def test_garbage_keeps_previous(self):
        der = self.write(pki()["ca"].ocsp_response(self.site), mtime=1000)
        self.staple.refresh()
        self.write(b"not DER", mtime=2000)
        self.assertFalse(self.staple.refresh())
        self.assertEqual(self.staple.response_for(self.site.cert.serial_number), der)
        self.assertIn("ignoring OCSP response", self.warnings()[0])

    def test_missing_file_warned_once(self):
        self.assertFalse(self.staple.refresh())
        self.assertFalse(self.staple.refresh())
        self.assertEqual(len(self.warnings()), 1)
        self.assertIn("cannot read OCSP response", self.warnings()[0])

    def test_expired_not_stapled(self):
        """Past its next update, a response is no longer stapled (strict clients would fail)."""
        self.write(pki()["ca"].ocsp_response(self.site, hours=1))
        self.staple.refresh()
        serial = self.site.cert.serial_number
        self.assertTrue(self.staple.response_for(serial))
        self.clock.advance(2 * 3600)
        self.staple.refresh()
        self.assertEqual(self.staple.response_for(serial), b"")
        self.assertIn("expired", self.warnings()[0])

    def test_revoked_logged(self):
        self.write(pki()["ca"].ocsp_response(self.site, good=False))
        self.staple.refresh()
        self.assertIn("REVOKED", formatEvent(self.events[0]))

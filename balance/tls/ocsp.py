# -*- test-case-name: tests.tls.test_ocsp -*-
"""
The OCSP response a listener staples: read from the configured DER file,
checked once when read, and re-read when the file changes (an external job,
such as a cron entry running C{openssl ocsp}, renews it).

The handshake only reads L{OCSPStaple.response_for}; reading and parsing
the file happens in L{OCSPStaple.refresh}, which the listener's
L{balance.tls.server.ServerTLS} calls from a timer.
"""

from __future__ import annotations

import datetime
import os

from cryptography.x509 import ocsp
from twisted.logger import Logger


class OCSPStaple:
    """
    One stapled OCSP response and where it comes from.

    :ivar path: the DER file.
    :ivar serial: the serial number of the certificate the response is
        about, or L{None} while there is no usable response.
    :ivar next_update: when the response stops being valid (POSIX seconds),
        or L{None} when it does not say.
    """

    log = Logger()

    def __init__(self, path: str, clock, listener: str = ""):
        """
        :param path: the DER file of the OCSP response.
        :param clock: an L{IReactorTime}, to tell whether the response is
            still current.
        :param listener: the listener's name, for log lines.
        """
        self.path = path
        self.serial: int | None = None
        self.next_update: float | None = None
        self._der = b""
        self._clock = clock
        self._listener = listener
        self._stamp: tuple | None = None
        self._expired_logged = False

    def response_for(self, serial: int) -> bytes:
        """
        The DER response to staple for the certificate with serial number
        C{serial}, or C{b""} for none (another certificate, no usable
        response, or an expired one).
        """
        if serial != self.serial:
            return b""
        return self._der

    def refresh(self) -> bool:
        """
        Re-read the file if it changed since the last call (size, mtime or
        inode), and stop stapling a response once it has expired.  A file
        that cannot be read or parsed leaves the previous response in place,
        with a warning.

        :return: whether a new response was loaded.
        """
        self._check_expiry()
        try:
            st = os.stat(self.path)
        except OSError as e:
            if self._stamp != ("missing",):
                self._stamp = ("missing",)
                self.log.warn(
                    "listener {listener}: cannot read OCSP response {path}: {error}",
                    listener=self._listener,
                    path=self.path,
                    error=e.strerror,
                )
            return False
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            with open(self.path, "rb") as f:
                der = f.read()
            self.load(der)
        except (OSError, ValueError) as e:
            self.log.warn(
                "listener {listener}: ignoring OCSP response {path}: {error}",
                listener=self._listener,
                path=self.path,
                error=e,
            )
            return False
        return True

    def load(self, der: bytes) -> None:
        """
        Use C{der} from now on.

        :raise ValueError: if it is not a successful OCSP response about a
            single certificate; the previous response stays.
        """
        response = ocsp.load_der_ocsp_response(der)
        if response.response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
            raise ValueError(f"the responder answered {response.response_status.name}")
        next_update = response.next_update_utc
        if response.certificate_status is ocsp.OCSPCertStatus.REVOKED:
            self.log.error(
                "listener {listener}: the OCSP response in {path} says the certificate "
                "with serial {serial:x} is REVOKED",
                listener=self._listener,
                path=self.path,
                serial=response.serial_number,
            )
        self._der = der
        self.serial = response.serial_number
        self.next_update = None if next_update is None else next_update.timestamp()
        self._expired_logged = False
        self._check_expiry()

    def _check_expiry(self) -> None:
        if self.next_update is None or self._clock.seconds() < self.next_update:
            return
        # An expired staple makes strict clients (must-staple) fail the
        # handshake; no staple just makes them ask the CA themselves.
        self._der = b""
        if not self._expired_logged:
            self._expired_logged = True
            when = datetime.datetime.fromtimestamp(self.next_update, datetime.UTC)
            self.log.warn(
                "listener {listener}: OCSP response {path} expired at {when}; "
                "not stapling until the file is renewed",
                listener=self._listener,
                path=self.path,
                when=when.isoformat(),
            )

# -*- test-case-name: tests.admin.test_service -*-
"""
The admin API's listener: ``admin.listen`` served by ``twisted.web``,
with the bearer token read from ``admin.token_file`` at start.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.web.server import Site

from balance.admin.resource import AdminResource
from balance.config import model
from balance.listener import ListenerService

__all__ = ["AdminService", "AdminTokenError", "read_token"]


class AdminTokenError(Exception):
    """
    The token file of ``admin.token_file`` cannot be used: it cannot be
    read, or it holds no token.  Raised at start, which stops ``twistd``.
    """


def read_token(path: str) -> bytes:
    """
    Read the admin API's bearer token: the file's contents without leading
    and trailing whitespace (so a trailing newline does not count).

    :param path: The file's path.
    :raises AdminTokenError: If it cannot be read, or is empty.
    """
    try:
        with open(path, "rb") as f:
            token = f.read().strip()
    except OSError as e:
        raise AdminTokenError(
            f"admin.token_file {path}: cannot read it ({e.strerror}); create it with "
            "the token, readable by the user Balance starts as"
        ) from e
    if not token:
        raise AdminTokenError(
            f"admin.token_file {path}: the file is empty; put the token in it "
            "(for example: openssl rand -hex 32 > the file)"
        )
    if any(c <= 0x20 or c >= 0x7F for c in token):
        raise AdminTokenError(
            f"admin.token_file {path}: the token contains spaces or non-ASCII bytes; "
            "an HTTP Authorization header cannot carry it"
        )
    return token


class _Site(Site):
    """
    The admin ``Site``: no access log line per request (the dashboard polls
    every second, and the admin API is not what operators audit traffic
    of), no start/stop lines.
    """

    noisy = False

    def log(self, request) -> None:
        pass


class _Connections(WrappingFactory):
    """
    Keeps the admin API's open connections, so that stopping the service
    can close them (browsers keep dashboard connections alive), as
    :class:`~balance.listener.ListenerService` expects of a factory.
    """

    noisy = False

    def __init__(self, wrapped):
        super().__init__(wrapped)
        self._drained: list[Deferred] = []

    def active(self) -> int:
        """The number of open connections."""
        return len(self.protocols)

    def unregisterProtocol(self, p) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)

    def drain(self) -> Deferred:
        """
        Close every connection once its pending output is written.

        :return: A Deferred that fires when all are closed.
        """
        if not self.protocols:
            return succeed(None)
        d = Deferred()
        self._drained.append(d)
        for protocol in list(self.protocols):
            protocol.transport.loseConnection()
        return d

    def abort_all(self) -> None:
        """Close every connection at once, dropping pending output."""
        for protocol in list(self.protocols):
            protocol.transport.abortConnection()


class AdminService(ListenerService):
    """
    Serve the admin API on ``admin.listen``.

    Like every listener, a bind failure raises from
    ``privilegedStartService``/``startService`` and stops ``twistd`` at
    start-up; so does an unusable ``token_file``, which is read then
    (before privileges are dropped, so it may be readable by root only).

    Stopping it stops accepting, then closes the open connections (waiting
    at most ``drain_timeout`` seconds for their pending output).  Stop it
    after the listeners have drained, so that ``GET /ready`` keeps
    answering 503 while they do.

    :ivar resource: The :class:`~balance.admin.resource.AdminResource`.
    :ivar port: The listening port once started (from
        :class:`~balance.listener.ListenerService`); for example
        ``service.port.getHost().port`` after listening on ``tcp:0``.
    """

    log = Logger()

    def __init__(
        self,
        admin: model.Admin,
        target,
        reactor,
        drain_timeout: float = 5.0,
        resource_class=AdminResource,
    ):
        """
        :param admin: The ``admin`` section of the config.
        :param target: The running process, an
            :class:`~balance.admin.IAdminTarget` provider.
        :param reactor: The reactor to listen with and to time requests.
        :param drain_timeout: Seconds open connections may take to close on
            stop before they are aborted.
        :param resource_class: The resource answering the API (the workers'
            parent answers some paths from its workers).
        :raises ValueError: If ``admin.listen`` is not an endpoint string.
        """
        self.resource = resource_class(target)
        site = _Site(self.resource, reactor=reactor, timeout=60, parsePOSTFormSubmission=False)
        super().__init__(admin.listen, _Connections(site), reactor, drain_timeout)
        self.setName("admin")
        self._token_file = admin.token_file

    def privilegedStartService(self) -> None:
        """
        Read the token file, then bind.

        :raises AdminTokenError: If ``token_file`` is unusable.
        :raises Exception: Whatever the endpoint raised, typically
            ``twisted.internet.error.CannotListenError``.
        """
        if self._token_file is not None:
            self.resource.set_token(read_token(self._token_file))
        super().privilegedStartService()
        self._waitingForPort.addCallback(self._announce)

    def _announce(self, port):
        self.log.info("admin API listening on {address}", address=self.description)
        return port

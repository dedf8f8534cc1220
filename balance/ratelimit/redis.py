# -*- test-case-name: tests.ratelimit.test_redis_store,tests.integration.test_redis -*-
"""
The shared rate-limit store: token buckets in Redis, so that a fleet of
Balance processes enforces one limit together.

One decision is one round trip: C{EVALSHA} of a small Lua script (loaded on
connect; C{EVAL} when the server answers C{NOSCRIPT}, after a restart or a
C{SCRIPT FLUSH}) that reads the bucket, decides and writes it back
atomically.  The script takes the time from the server (C{TIME}), so
processes whose clocks disagree still share one bucket correctly.  A bucket
is one integer key, its GCRA C{tat} in microseconds (see
L{balance.ratelimit.bucket}), which expires on its own once the bucket is
full again: Redis holds only the buckets that are being limited.

When Redis cannot answer (not reachable, or no reply within C{timeout}, 100
ms by default), decisions follow C{failure_mode}: C{"open"} lets requests
pass, C{"closed"} refuses them (429, C{Retry-After: 1}).  While there is no
connection that costs nothing (no waiting); the store reconnects with
backoff and uses Redis again as soon as it is back.  Each change between
reachable and unreachable is logged once::

    rate limit store redis://10.0.0.5:6379/0 unreachable: Connection refused; failing open
    rate limit store redis://10.0.0.5:6379/0 reachable again
"""

from __future__ import annotations

import hashlib
from urllib.parse import unquote, urlsplit

from twisted.application.service import Service
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.logger import Logger
from zope.interface import implementer

from balance.ratelimit import IRateLimitStore
from balance.ratelimit._resp import RedisClient, RedisError, RedisTimeout

# KEYS[1]: the bucket.  ARGV[1]: microseconds per token; ARGV[2]: capacity.
# Returns "allowed remaining reset_after_us retry_after_us" as one string:
# a single bulk reply is cheaper to read than an array of integers.
SCRIPT = b"""\
if redis.replicate_commands then redis.replicate_commands() end
local interval = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or 0) or 0
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - capacity * interval
if allow_at > now + 0.001 then
  return string.format('0 0 %d %d', math.ceil(tat - now), math.ceil(allow_at - now))
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat),
           'PX', math.ceil((new_tat - now) / 1000))
return string.format('1 %d %d 0', math.floor((now - allow_at) / interval + 0.000001),
                     math.ceil(new_tat - now))
"""

SCRIPT_SHA = hashlib.sha1(SCRIPT).hexdigest().encode("ascii")

# The constant head of the EVALSHA command, encoded once.
_EVALSHA = b"*6\r\n$7\r\nEVALSHA\r\n$40\r\n" + SCRIPT_SHA + b"\r\n$1\r\n1\r\n"

FAILURE_MODES = ("open", "closed")

# The decisions while Redis cannot answer; "remaining" is unknown (-1) when
# letting requests through.
_FAIL_OPEN = (True, -1, 0.0, 0.0)
_FAIL_CLOSED = (False, 0, 1.0, 1.0)


class RedisURL:
    """
    A parsed C{redis://[[user]:password@]host[:port][/db]} (or C{rediss://}
    for TLS) URL.

    :ivar display: the URL without credentials, for logs.
    :raise ValueError: for anything else.
    """

    def __init__(self, url: str):
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f'expected "redis://host:port/db", got {url!r}')
        self.tls = parts.scheme == "rediss"
        if not parts.hostname:
            raise ValueError(f"no host in {url!r}")
        self.host = parts.hostname
        self.port = parts.port or 6379
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError(f"the database in {url!r} must be a number")
        self.db = int(path) if path else 0
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password is not None else None
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.display = f"{parts.scheme}://{host}:{self.port}/{self.db}"

    def endpoint(self, reactor, timeout: float):
        """A client endpoint to the server (TLS-wrapped for C{rediss}), built once."""
        endpoint = HostnameEndpoint(reactor, self.host, self.port, timeout=timeout)
        if self.tls:
            from twisted.internet.ssl import optionsForClientTLS

            endpoint = wrapClientTLS(optionsForClientTLS(self.host), endpoint)
        return endpoint


@implementer(IRateLimitStore)
class RedisRateLimitStore(Service):
    """
    Token buckets shared through Redis.  A service: it connects on start
    and disconnects on stop.

    :param endpoint: an L{twisted.internet.interfaces.IStreamClientEndpoint}
        to Redis.
    :param clock: an L{twisted.internet.interfaces.IReactorTime}.
    :param display: how logs name the server, without credentials.
    :param failure_mode: C{"open"} or C{"closed"}, see the module docstring.
    :param timeout: seconds a decision may wait for Redis.
    :param db: the database number to C{SELECT}.
    :param username: for C{AUTH}, with C{password}.
    :param password: for C{AUTH}, or L{None}.
    :param key_prefix: prepended to every bucket key.
    :param connect_timeout: seconds a connection attempt may take.
    :param backoff_max: the longest wait between reconnect attempts, in
        seconds (the first is 0.05 to 0.1 s, doubling each time).
    :param rng: randomness for reconnect jitter (a C{random.Random}).
    :ivar reachable: whether decisions currently come from Redis.
    """

    synchronous = False
    _log = Logger()

    def __init__(
        self,
        endpoint,
        clock,
        display: str = "redis",
        failure_mode: str = "open",
        timeout: float = 0.1,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        key_prefix: bytes = b"balance:rl:",
        connect_timeout: float = 1.0,
        backoff_max: float = 5.0,
        rng=None,
    ):
        if failure_mode not in FAILURE_MODES:
            raise ValueError(f"failure_mode must be open or closed, got {failure_mode!r}")
        self.display = display
        self.failure_mode = failure_mode
        self.reachable = False
        self._clock = clock
        self._failure = _FAIL_OPEN if failure_mode == "open" else _FAIL_CLOSED
        self._db = db
        self._username = username
        self._password = password
        self._prefix = key_prefix
        # Whether the current unreachable spell was logged already.
        self._down_logged = False
        self._ever_up = False
        self._client = RedisClient(
            endpoint,
            clock,
            prepare=self._prepare,
            on_up=self._up,
            on_down=self._down,
            timeout=timeout,
            connect_timeout=connect_timeout,
            backoff_max=backoff_max,
            rng=rng,
        )

    @classmethod
    def from_url(cls, url: str, reactor, failure_mode: str = "open", timeout: float = 0.1, **kw):
        """
        A store for C{url} (C{redis://[[user]:password@]host[:port][/db]},
        or C{rediss://} for TLS).

        :param reactor: the reactor: TCP, name resolution and time.
        :raise ValueError: for a URL of another form.
        """
        parsed = RedisURL(url)
        connect_timeout = kw.pop("connect_timeout", 1.0)
        return cls(
            parsed.endpoint(reactor, connect_timeout),
            reactor,
            display=parsed.display,
            failure_mode=failure_mode,
            timeout=timeout,
            db=parsed.db,
            username=parsed.username,
            password=parsed.password,
            connect_timeout=connect_timeout,
            **kw,
        )

    # -- IService ----------------------------------------------------------------------

    def startService(self):
        super().startService()
        self._client.start()

    def stopService(self):
        super().stopService()
        return self._client.stop()

    # -- IRateLimitStore -------------------------------------------------------------

    def take(self, key: bytes, rate: float, capacity: int):
        """
        Take one token from the shared bucket of C{key}; see
        L{IRateLimitStore.take}.

        :return: the failure-mode decision at once while there is no
            connection; otherwise a Deferred that fires with the decision
            within about C{timeout} seconds, and never fails.
        """
        proto = self._client.protocol
        if proto is None or not proto.connected:
            return self._failure
        key = self._prefix + key
        interval = b"%.3f" % (1e6 / rate)
        size = b"%d" % capacity
        d = proto.send(
            b"%s$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n"
            % (_EVALSHA, len(key), key, len(interval), interval, len(size), size)
        )
        return d.addCallbacks(
            self._decided, self._failed, errbackArgs=(proto, (key, interval, size))
        )

    def _decided(self, reply: bytes):
        try:
            allowed, remaining, reset_us, retry_us = reply.split(b" ")
            result = allowed == b"1", int(remaining), int(reset_us) / 1e6, int(retry_us) / 1e6
        except (AttributeError, TypeError, ValueError):
            # Not our script's answer (a proxy in between, another script
            # under our SHA?): never let a decision fail.
            self._went_down(f"unexpected reply {reply!r:.60}")
            return self._failure
        if not self.reachable:
            self._up()
        return result

    def _failed(self, failure, proto=None, args=None):
        if (
            args is not None
            and failure.check(RedisError)
            and failure.value.code == "NOSCRIPT"
            and proto.connected
        ):
            # The server forgot the script (restart, SCRIPT FLUSH): send it
            # along this time; EVAL caches it, so EVALSHA works again next.
            d = proto.execute(b"EVAL", SCRIPT, b"1", *args)
            return d.addCallbacks(self._decided, self._failed)
        self._went_down(_describe(failure))
        return self._failure

    # -- connection state --------------------------------------------------------------

    async def _prepare(self, proto) -> None:
        """Make a fresh connection ready: AUTH, SELECT, SCRIPT LOAD."""
        if self._password is not None:
            if self._username is not None:
                await proto.execute(b"AUTH", self._username, self._password)
            else:
                await proto.execute(b"AUTH", self._password)
        if self._db:
            await proto.execute(b"SELECT", b"%d" % self._db)
        sha = await proto.execute(b"SCRIPT", b"LOAD", SCRIPT)
        if sha != SCRIPT_SHA:
            raise RedisError(f"SCRIPT LOAD answered {sha!r}, expected {SCRIPT_SHA!r}")

    def _up(self) -> None:
        self.reachable = True
        if self._down_logged:
            self._down_logged = False
            self._log.info("rate limit store {store} reachable again", store=self.display)
        elif not self._ever_up:
            self._log.info("rate limit store {store} connected", store=self.display)
        self._ever_up = True

    def _down(self, failure) -> None:
        self._went_down(_describe(failure))

    def _went_down(self, why: str) -> None:
        self.reachable = False
        if not self._down_logged and self.running:
            self._down_logged = True
            self._log.warn(
                "rate limit store {store} unreachable: {why}; failing {mode}",
                store=self.display,
                why=why,
                mode=self.failure_mode,
            )


def _describe(failure) -> str:
    """A one-line reason for logs, without a traceback."""
    value = failure.value
    if isinstance(value, RedisTimeout):
        return str(value)
    if isinstance(value, RedisError):
        return f"error reply {value}"
    return failure.getErrorMessage() or type(value).__name__

# -*- test-case-name: tests.observe.test_logs -*-
"""
Structured logs: Balance's own log events (not the access log) as JSON
lines, one object per event, for log shippers (Loki, Elasticsearch,
journald's JSON mode, Cloud Logging)::

    twistd --logger balance.observe.logs.json -n balance --config FILE

Each line holds C{time} (ISO 8601, UTC, microseconds), C{level}
(C{debug}, C{info}, C{warn}, C{error}, C{critical}), C{namespace} (the
emitting module or class), C{message} (the formatted text, as the plain
log shows it), C{failure} (a traceback, when there is one) and every
field the event was logged with, by name (C{backend}, C{cluster},
C{healthy}, C{reason}, C{worker}...), as JSON values (C{repr} for what
JSON cannot hold).  Twisted's own C{jsonFileLogObserver} writes
record-separated text (RFC 7464) with its internal keys; this writes the
newline-delimited JSON that shippers read.

Worker processes (C{workers: N}) always log this way to their parent,
which re-emits their events with their fields and a C{worker} field, so
that the parent's log, plain or JSON, has every worker's structured
fields.
"""

from __future__ import annotations

import datetime
import json as _json
import sys

from twisted.logger import LogLevel, formatEvent

__all__ = ["JSONLinesObserver", "event_fields", "json"]

_UTC = datetime.UTC


def _value(value):
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list | tuple) and len(value) < 64:
        return [_value(v) for v in value]
    return repr(value)


def event_fields(event: dict) -> dict:
    """
    The fields of a log event as JSON values: those it was logged with
    (not Twisted's C{log_*} keys), by name.
    """
    return {
        key: _value(value)
        for key, value in event.items()
        if not key.startswith("log_") and key not in ("message", "format", "isError", "system")
    }


class JSONLinesObserver:
    """
    A log observer writing each event as one line of JSON to C{stream}.

    :param stream: a text stream (flushed after each line, so that lines
        reach a pipe or the journal as they happen).
    """

    def __init__(self, stream):
        self._stream = stream

    def __call__(self, event: dict) -> None:
        level = event.get("log_level") or LogLevel.info
        when = event.get("log_time")
        record = {
            "time": datetime.datetime.fromtimestamp(when, _UTC).isoformat(timespec="microseconds")
            if when is not None
            else None,
            "level": level.name,
            "namespace": event.get("log_namespace", ""),
            "message": formatEvent(event),
        }
        failure = event.get("log_failure")
        if failure is not None:
            record["failure"] = failure.getTraceback()
        for key, value in event_fields(event).items():
            record.setdefault(key, value)
        try:
            line = _json.dumps(record, separators=(",", ":"), default=repr)
        except ValueError:  # a circular structure
            record = {k: record[k] for k in ("time", "level", "namespace", "message")}
            line = _json.dumps(record, separators=(",", ":"))
        self._stream.write(line + "\n")
        self._stream.flush()


def json():
    """The observer factory for C{twistd --logger balance.observe.logs.json}: JSON lines on stdout."""
    return JSONLinesObserver(sys.stdout)

"""
The twistd plugin's options and service maker: C{twistd balance --config FILE}.
"""

from __future__ import annotations

import sys

from twisted.python import usage

from balance.config.validate import ConfigError, load_config


class Options(usage.Options):
    """
    Command line of C{twistd balance}.

    The config is loaded and validated here, in L{postOptions}, so that an
    invalid file stops twistd before it daemonizes or binds anything, with
    the error lines and exit status 1 rather than a traceback.
    """

    synopsis = "--config FILE [--check]"
    longdesc = (
        "Run Balance, an L4/L7 proxy and load balancer, on a YAML config file. "
        "With --check, only validate the file: print 'FILE: OK' or the errors "
        "and exit 0 or 1, like nginx -t."
    )
    optParameters = [
        ["config", "c", None, "The YAML config file."],
    ]
    optFlags = [
        ["check", None, "Validate the config file and exit without starting anything."],
    ]

    model = None

    def postOptions(self):
        path = self["config"]
        if not path:
            raise usage.UsageError("--config FILE is required")
        try:
            self.model = load_config(path)
        except ConfigError as e:
            for line in e.errors:
                print(line, file=sys.stderr)
            sys.exit(1)
        if self["check"]:
            print(f"{path}: OK")
            sys.exit(0)


def makeService(options: Options):
    """Build the service tree of a validated config on the global reactor."""
    from twisted.internet import reactor

    from balance.service import build

    return build(options.model, reactor)

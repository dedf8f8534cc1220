"""L{balance.uvloopreactor}: installed in a child process (a process gets one reactor)."""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial.unittest import SkipTest, TestCase

_CHILD = """
from balance.uvloopreactor import install
install()
from twisted.internet import reactor
reactor.callLater(0, reactor.stop)
reactor.run()
print(type(reactor).__name__, type(reactor._asyncioEventloop).__module__)
"""


class InstallTests(TestCase):
    def test_asyncio_reactor_on_uvloop(self):
        """install() makes the global reactor Twisted's asyncio one, running on uvloop."""
        try:
            import uvloop  # noqa: F401
        except ImportError:
            if os.environ.get("CI") == "true":
                raise  # tox installs it: missing in CI is a failure
            raise SkipTest("uvloop is not installed (pip install .[uvloop])") from None
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        out = subprocess.run(
            [sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, timeout=60
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(out.stdout.split(), ["AsyncioSelectorReactor", "uvloop"])

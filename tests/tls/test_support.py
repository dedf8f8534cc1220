"""
The test helpers' rule for external tools: skip locally, fail in CI.
"""

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests import helpers
from tests.tls import support


class RequireTests(SynchronousTestCase):
    def setUp(self):
        self.patch(helpers.shutil, "which", lambda name: "/bin/" + name if name == "b" else None)

    def test_found(self):
        self.assertEqual(support.require("a", "b"), "/bin/b")

    def test_missing_locally(self):
        self.patch(helpers.os, "environ", {})
        self.assertRaises(SkipTest, support.require, "a")

    def test_missing_in_ci(self):
        self.patch(helpers.os, "environ", {"CI": "true"})
        e = self.assertRaises(AssertionError, support.require, "a")
        self.assertIn("CI must have it", str(e))

"""
The shipped config files: C{etc/balance.yaml} is valid, every file in
C{etc/invalid/} gives exactly the errors written beside it, and the reference
example uses every key of the contract.
"""

from pathlib import Path

from twisted.trial import unittest

from balance.config.validate import ConfigError, load_config

ETC = Path(__file__).resolve().parents[2] / "etc"


class ExampleTests(unittest.TestCase):
    def test_shipped(self):
        config = load_config(str(ETC / "balance.yaml"))
        self.assertEqual([w.name for w in config.whoami], ["alpha", "beta"])
        self.assertEqual(config.listeners[0].listen, "tcp:8080:interface=127.0.0.1")

    def test_examples(self):
        """Every runnable example in etc/examples/ is valid."""
        examples = [p for p in (ETC / "examples").glob("*.yaml") if p.name != "reference.yaml"]
        self.assertTrue(examples)
        for path in examples:
            load_config(str(path))

    def test_invalid(self):
        cases = sorted((ETC / "invalid").glob("*.yaml"))
        self.assertTrue(cases)
        for case in cases:
            expected = case.with_suffix(".expected").read_text().splitlines()
            e = self.assertRaises(ConfigError, load_config, str(case))
            prefix = str(case.parent) + "/"
            got = [line.removeprefix(prefix) for line in e.errors]
            self.assertEqual(got, expected, case.name)

    def test_reference(self):
        """
        Every key of CONFIG.md is understood: the only complaints about the
        reference file are features this version does not implement yet, and
        the certificate files of its imaginary site, which do not exist.
        """
        e = self.assertRaises(ConfigError, load_config, str(ETC / "examples" / "reference.yaml"))
        for line in e.errors:
            self.assertTrue(
                line.endswith("is not implemented in this version of Balance")
                or ": cannot read certs/" in line,
                line,
            )

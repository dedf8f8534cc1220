"""Tests for L{balance.config.units}."""

from twisted.trial import unittest

from balance.config.units import formatDuration, parseDuration, parseSize


class DurationTests(unittest.TestCase):
    def test_units(self):
        self.assertEqual(parseDuration("250ms"), 0.25)
        self.assertEqual(parseDuration("5s"), 5.0)
        self.assertEqual(parseDuration("2m"), 120.0)
        self.assertEqual(parseDuration("1h"), 3600.0)
        self.assertEqual(parseDuration("1.5s"), 1.5)
        self.assertAlmostEqual(parseDuration("100us"), 0.0001)

    def test_invalid(self):
        for text in ("5", "5 sec", "-1s", "s", "", "1.s", "5S"):
            self.assertRaises(ValueError, parseDuration, text)

    def test_format(self):
        self.assertEqual(formatDuration(0.25), "250ms")
        self.assertEqual(formatDuration(120), "2m")
        self.assertEqual(formatDuration(30), "30s")
        self.assertEqual(formatDuration(0), "0s")


class SizeTests(unittest.TestCase):
    def test_units(self):
        self.assertEqual(parseSize(10), 10)
        self.assertEqual(parseSize("64KiB"), 65536)
        self.assertEqual(parseSize("10MiB"), 10 * 1024 * 1024)
        self.assertEqual(parseSize("1GiB"), 1024**3)
        self.assertEqual(parseSize("2MB"), 2_000_000)
        self.assertEqual(parseSize("512"), 512)

    def test_invalid(self):
        for value in (-1, "lots", "5 parsecs", True, None, 1.5, "KiB"):
            self.assertRaises(ValueError, parseSize, value)

"""Tests for L{balance.config.units}."""

from twisted.trial import unittest

from balance.config.units import format_duration, parse_duration, parse_size


class DurationTests(unittest.TestCase):
    def test_units(self):
        self.assertEqual(parse_duration("250ms"), 0.25)
        self.assertEqual(parse_duration("5s"), 5.0)
        self.assertEqual(parse_duration("2m"), 120.0)
        self.assertEqual(parse_duration("1h"), 3600.0)
        self.assertEqual(parse_duration("1.5s"), 1.5)
        self.assertAlmostEqual(parse_duration("100us"), 0.0001)

    def test_invalid(self):
        for text in ("5", "5 sec", "-1s", "s", "", "1.s", "5S"):
            self.assertRaises(ValueError, parse_duration, text)

    def test_format(self):
        self.assertEqual(format_duration(0.25), "250ms")
        self.assertEqual(format_duration(120), "2m")
        self.assertEqual(format_duration(30), "30s")
        self.assertEqual(format_duration(0), "0s")


class SizeTests(unittest.TestCase):
    def test_units(self):
        self.assertEqual(parse_size(10), 10)
        self.assertEqual(parse_size("64KiB"), 65536)
        self.assertEqual(parse_size("10MiB"), 10 * 1024 * 1024)
        self.assertEqual(parse_size("1GiB"), 1024**3)
        self.assertEqual(parse_size("2MB"), 2_000_000)
        self.assertEqual(parse_size("512"), 512)

    def test_invalid(self):
        for value in (-1, "lots", "5 parsecs", True, None, 1.5, "KiB"):
            self.assertRaises(ValueError, parse_size, value)

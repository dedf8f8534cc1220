"""Tests for L{balance.config.load}: YAML with line marks."""

from twisted.trial import unittest

from balance.config.load import ConfigSyntaxError, load_file, load_text


class LoadTests(unittest.TestCase):
    def test_lines(self):
        """Every key and list item remembers the line it was written on."""
        data = load_text("a: 1\nb:\n  - {x: 2}\n  - y: 3\n")
        self.assertEqual(data, {"a": 1, "b": [{"x": 2}, {"y": 3}]})
        self.assertEqual(data.key_lines, {"a": 1, "b": 2})
        self.assertEqual(data["b"].item_lines, [3, 4])
        self.assertEqual(data["b"][1].key_lines, {"y": 4})

    def test_keys_stay_text(self):
        """
        Keys are names: YAML 1.1 would read C{on:} (the retry key) as a
        boolean; here it stays the string "on".
        """
        data = load_text("on: [reset]\nyes: 1\n")
        self.assertEqual(data, {"on": ["reset"], "yes": 1})

    def test_duplicates(self):
        data = load_text("a: 1\nb: 2\na: 3\n")
        self.assertEqual(data.duplicates, [("a", 3)])

    def test_syntax_error(self):
        e = self.assertRaises(ConfigSyntaxError, load_text, "a: [1\nb: 2\n", "f.yaml")
        self.assertEqual(e.path, "f.yaml")
        self.assertEqual(e.line, 2)
        self.assertIn("invalid YAML", str(e))
        self.assertTrue(str(e).startswith("f.yaml:2: "))

    def test_complex_key(self):
        e = self.assertRaises(ConfigSyntaxError, load_text, "? [a, b]\n: 1\n", "f.yaml")
        self.assertEqual(str(e), "f.yaml:1: a mapping key must be a plain value")

    def test_empty(self):
        self.assertIsNone(load_text(""))

    def test_unreadable(self):
        e = self.assertRaises(ConfigSyntaxError, load_file, self.mktemp())
        self.assertIn("cannot read: No such file or directory", str(e))

    def test_not_utf8(self):
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"a: \xff\xfe\n")
        e = self.assertRaises(ConfigSyntaxError, load_file, path)
        self.assertIn("not UTF-8", str(e))

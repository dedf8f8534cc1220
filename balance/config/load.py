"""
Read YAML keeping the line of every key and item, so that validation errors
can say C{FILE:LINE: key.path: ...}.

PyYAML's composer gives nodes with marks; we construct plain Python values
from them ourselves, wrapping mappings and sequences in subclasses of L{dict}
and L{list} that remember where each entry was written.
"""

from __future__ import annotations

import yaml


class ConfigSyntaxError(Exception):
    """
    The file is not readable YAML.

    @ivar line: 1-based line of the problem, or 0 when unknown.
    """

    def __init__(self, path: str, line: int, message: str):
        super().__init__(f"{path}:{line}: {message}")
        self.path = path
        self.line = line
        self.message = message


class MarkedDict(dict):
    """
    A mapping read from YAML.

    @ivar line: The line the mapping starts on.
    @ivar key_lines: The line of each key.
    @ivar duplicates: C{(key, line)} of keys written more than once.
    """

    line = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.key_lines: dict = {}
        self.duplicates: list = []


class MarkedList(list):
    """
    A sequence read from YAML.

    @ivar line: The line the sequence starts on.
    @ivar item_lines: The line of each item.
    """

    line = 0

    def __init__(self, *args):
        super().__init__(*args)
        self.item_lines: list = []


def _line(node) -> int:
    return node.start_mark.line + 1


# Aliases are expanded into copies, so a few lines can stand for billions
# of values ("billion laughs"): beyond this many, the file is refused.
_MAX_VALUES = 100_000


def _construct(constructor: yaml.constructor.SafeConstructor, node):
    constructor.values_left -= 1
    if constructor.values_left < 0:
        raise ConfigSyntaxError(
            "", _line(node), f"more than {_MAX_VALUES} values (aliases expanding without bound?)"
        )
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        if node in constructor.building:
            raise ConfigSyntaxError("", _line(node), "an alias refers to a collection it is in")
        constructor.building.append(node)
        try:
            return _collection(constructor, node)
        finally:
            constructor.building.pop()
    return constructor.construct_object(node, deep=True)


def _collection(constructor: yaml.constructor.SafeConstructor, node):
    if isinstance(node, yaml.MappingNode):
        constructor.flatten_mapping(node)
        result = MarkedDict()
        result.line = _line(node)
        for key_node, value_node in node.value:
            # Keys are names: keep their text, so that `on:` (a boolean in
            # YAML 1.1) stays the string "on".
            if not isinstance(key_node, yaml.ScalarNode):
                raise ConfigSyntaxError("", _line(key_node), "a mapping key must be a plain value")
            key = key_node.value
            if key in result:
                result.duplicates.append((key, _line(key_node)))
            result[key] = _construct(constructor, value_node)
            result.key_lines[key] = _line(key_node)
        return result
    result = MarkedList()
    result.line = _line(node)
    for item_node in node.value:
        result.append(_construct(constructor, item_node))
        result.item_lines.append(_line(item_node))
    return result


def load_text(text: str, path: str = "<string>"):
    """
    Parse YAML text into plain values with line marks.

    @return: A L{MarkedDict} (or whatever the document's top is, or L{None}
        for an empty document).
    @raise ConfigSyntaxError: If the text is not YAML.
    """
    try:
        # The reader checks the characters here already.
        loader = yaml.SafeLoader(text)
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        raise ConfigSyntaxError(path, line, f"invalid YAML: {e.reason}") from None
    loader.values_left = _MAX_VALUES
    loader.building = []
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        return _construct(loader, node)
    except ConfigSyntaxError as e:
        raise ConfigSyntaxError(path, e.line, e.message) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else 0
        what = " ".join(p for p in (e.context, e.problem) if p)
        raise ConfigSyntaxError(path, line, f"invalid YAML: {what}") from None
    except yaml.YAMLError as e:
        what = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigSyntaxError(path, 0, f"invalid YAML: {what}") from None
    except RecursionError:
        raise ConfigSyntaxError(path, 0, "invalid YAML: nested too deeply") from None
    finally:
        loader.dispose()


def load_file(path: str):
    """
    Read and parse a YAML file.

    @raise ConfigSyntaxError: If it cannot be read or is not YAML.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigSyntaxError(path, 0, f"cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigSyntaxError(path, 0, f"not UTF-8 text: {e.reason}") from None
    return load_text(text, path)

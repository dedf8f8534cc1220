# -*- test-case-name: tests.http.test_hpack -*-
"""
HPACK (RFC 7541), the header compression of HTTP/2, as Balance's server
side needs it.

The L{Decoder} is complete: indexed fields, literals with and without
indexing (and never indexed), the dynamic table with its size updates,
Huffman-coded strings.  It is tuned for what clients send again and
again: a header block that only refers to the tables is decoded once per
state of the dynamic table and kept, and a Huffman-coded string is
decoded once per process.

The L{Encoder} never adds to the peer's dynamic table, so it has no state
but one size update (to 0) at the start of its first block: a field is a
static-table index when the table has it whole, else a literal without
indexing (never indexed for credentials and cookies), with the name from
the static table when it has the name.  The encoding of a field depends
on the field alone, so it is kept for the process: the fields of a
backend's responses (C{server}, C{content-type}, C{via}, the same
C{content-length}) are encoded once.

Everything here is pure and works on bytes.
"""

from __future__ import annotations

__all__ = [
    "HPACKError",
    "HeaderListTooLarge",
    "Decoder",
    "Encoder",
    "STATIC_TABLE",
    "huffman_decode",
    "huffman_encode",
    "encode_integer",
]

#: The static table (RFC 7541 Appendix A); index 1 is the first entry.
STATIC_TABLE = (
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
)

# The Huffman code (RFC 7541 Appendix B): (code, bit length) per symbol,
# 256 being EOS.
_HUFFMAN = (
    (0x1FF8, 13),
    (0x7FFFD8, 23),
    (0xFFFFFE2, 28),
    (0xFFFFFE3, 28),
    (0xFFFFFE4, 28),
    (0xFFFFFE5, 28),
    (0xFFFFFE6, 28),
    (0xFFFFFE7, 28),
    (0xFFFFFE8, 28),
    (0xFFFFEA, 24),
    (0x3FFFFFFC, 30),
    (0xFFFFFE9, 28),
    (0xFFFFFEA, 28),
    (0x3FFFFFFD, 30),
    (0xFFFFFEB, 28),
    (0xFFFFFEC, 28),
    (0xFFFFFED, 28),
    (0xFFFFFEE, 28),
    (0xFFFFFEF, 28),
    (0xFFFFFF0, 28),
    (0xFFFFFF1, 28),
    (0xFFFFFF2, 28),
    (0x3FFFFFFE, 30),
    (0xFFFFFF3, 28),
    (0xFFFFFF4, 28),
    (0xFFFFFF5, 28),
    (0xFFFFFF6, 28),
    (0xFFFFFF7, 28),
    (0xFFFFFF8, 28),
    (0xFFFFFF9, 28),
    (0xFFFFFFA, 28),
    (0xFFFFFFB, 28),
    (0x14, 6),
    (0x3F8, 10),
    (0x3F9, 10),
    (0xFFA, 12),
    (0x1FF9, 13),
    (0x15, 6),
    (0xF8, 8),
    (0x7FA, 11),
    (0x3FA, 10),
    (0x3FB, 10),
    (0xF9, 8),
    (0x7FB, 11),
    (0xFA, 8),
    (0x16, 6),
    (0x17, 6),
    (0x18, 6),
    (0x0, 5),
    (0x1, 5),
    (0x2, 5),
    (0x19, 6),
    (0x1A, 6),
    (0x1B, 6),
    (0x1C, 6),
    (0x1D, 6),
    (0x1E, 6),
    (0x1F, 6),
    (0x5C, 7),
    (0xFB, 8),
    (0x7FFC, 15),
    (0x20, 6),
    (0xFFB, 12),
    (0x3FC, 10),
    (0x1FFA, 13),
    (0x21, 6),
    (0x5D, 7),
    (0x5E, 7),
    (0x5F, 7),
    (0x60, 7),
    (0x61, 7),
    (0x62, 7),
    (0x63, 7),
    (0x64, 7),
    (0x65, 7),
    (0x66, 7),
    (0x67, 7),
    (0x68, 7),
    (0x69, 7),
    (0x6A, 7),
    (0x6B, 7),
    (0x6C, 7),
    (0x6D, 7),
    (0x6E, 7),
    (0x6F, 7),
    (0x70, 7),
    (0x71, 7),
    (0x72, 7),
    (0xFC, 8),
    (0x73, 7),
    (0xFD, 8),
    (0x1FFB, 13),
    (0x7FFF0, 19),
    (0x1FFC, 13),
    (0x3FFC, 14),
    (0x22, 6),
    (0x7FFD, 15),
    (0x3, 5),
    (0x23, 6),
    (0x4, 5),
    (0x24, 6),
    (0x5, 5),
    (0x25, 6),
    (0x26, 6),
    (0x27, 6),
    (0x6, 5),
    (0x74, 7),
    (0x75, 7),
    (0x28, 6),
    (0x29, 6),
    (0x2A, 6),
    (0x7, 5),
    (0x2B, 6),
    (0x76, 7),
    (0x2C, 6),
    (0x8, 5),
    (0x9, 5),
    (0x2D, 6),
    (0x77, 7),
    (0x78, 7),
    (0x79, 7),
    (0x7A, 7),
    (0x7B, 7),
    (0x7FFE, 15),
    (0x7FC, 11),
    (0x3FFD, 14),
    (0x1FFD, 13),
    (0xFFFFFFC, 28),
    (0xFFFE6, 20),
    (0x3FFFD2, 22),
    (0xFFFE7, 20),
    (0xFFFE8, 20),
    (0x3FFFD3, 22),
    (0x3FFFD4, 22),
    (0x3FFFD5, 22),
    (0x7FFFD9, 23),
    (0x3FFFD6, 22),
    (0x7FFFDA, 23),
    (0x7FFFDB, 23),
    (0x7FFFDC, 23),
    (0x7FFFDD, 23),
    (0x7FFFDE, 23),
    (0xFFFFEB, 24),
    (0x7FFFDF, 23),
    (0xFFFFEC, 24),
    (0xFFFFED, 24),
    (0x3FFFD7, 22),
    (0x7FFFE0, 23),
    (0xFFFFEE, 24),
    (0x7FFFE1, 23),
    (0x7FFFE2, 23),
    (0x7FFFE3, 23),
    (0x7FFFE4, 23),
    (0x1FFFDC, 21),
    (0x3FFFD8, 22),
    (0x7FFFE5, 23),
    (0x3FFFD9, 22),
    (0x7FFFE6, 23),
    (0x7FFFE7, 23),
    (0xFFFFEF, 24),
    (0x3FFFDA, 22),
    (0x1FFFDD, 21),
    (0xFFFE9, 20),
    (0x3FFFDB, 22),
    (0x3FFFDC, 22),
    (0x7FFFE8, 23),
    (0x7FFFE9, 23),
    (0x1FFFDE, 21),
    (0x7FFFEA, 23),
    (0x3FFFDD, 22),
    (0x3FFFDE, 22),
    (0xFFFFF0, 24),
    (0x1FFFDF, 21),
    (0x3FFFDF, 22),
    (0x7FFFEB, 23),
    (0x7FFFEC, 23),
    (0x1FFFE0, 21),
    (0x1FFFE1, 21),
    (0x3FFFE0, 22),
    (0x1FFFE2, 21),
    (0x7FFFED, 23),
    (0x3FFFE1, 22),
    (0x7FFFEE, 23),
    (0x7FFFEF, 23),
    (0xFFFEA, 20),
    (0x3FFFE2, 22),
    (0x3FFFE3, 22),
    (0x3FFFE4, 22),
    (0x7FFFF0, 23),
    (0x3FFFE5, 22),
    (0x3FFFE6, 22),
    (0x7FFFF1, 23),
    (0x3FFFFE0, 26),
    (0x3FFFFE1, 26),
    (0xFFFEB, 20),
    (0x7FFF1, 19),
    (0x3FFFE7, 22),
    (0x7FFFF2, 23),
    (0x3FFFE8, 22),
    (0x1FFFFEC, 25),
    (0x3FFFFE2, 26),
    (0x3FFFFE3, 26),
    (0x3FFFFE4, 26),
    (0x7FFFFDE, 27),
    (0x7FFFFDF, 27),
    (0x3FFFFE5, 26),
    (0xFFFFF1, 24),
    (0x1FFFFED, 25),
    (0x7FFF2, 19),
    (0x1FFFE3, 21),
    (0x3FFFFE6, 26),
    (0x7FFFFE0, 27),
    (0x7FFFFE1, 27),
    (0x3FFFFE7, 26),
    (0x7FFFFE2, 27),
    (0xFFFFF2, 24),
    (0x1FFFE4, 21),
    (0x1FFFE5, 21),
    (0x3FFFFE8, 26),
    (0x3FFFFE9, 26),
    (0xFFFFFFD, 28),
    (0x7FFFFE3, 27),
    (0x7FFFFE4, 27),
    (0x7FFFFE5, 27),
    (0xFFFEC, 20),
    (0xFFFFF3, 24),
    (0xFFFED, 20),
    (0x1FFFE6, 21),
    (0x3FFFE9, 22),
    (0x1FFFE7, 21),
    (0x1FFFE8, 21),
    (0x7FFFF3, 23),
    (0x3FFFEA, 22),
    (0x3FFFEB, 22),
    (0x1FFFFEE, 25),
    (0x1FFFFEF, 25),
    (0xFFFFF4, 24),
    (0xFFFFF5, 24),
    (0x3FFFFEA, 26),
    (0x7FFFF4, 23),
    (0x3FFFFEB, 26),
    (0x7FFFFE6, 27),
    (0x3FFFFEC, 26),
    (0x3FFFFED, 26),
    (0x7FFFFE7, 27),
    (0x7FFFFE8, 27),
    (0x7FFFFE9, 27),
    (0x7FFFFEA, 27),
    (0x7FFFFEB, 27),
    (0xFFFFFFE, 28),
    (0x7FFFFEC, 27),
    (0x7FFFFED, 27),
    (0x7FFFFEE, 27),
    (0x7FFFFEF, 27),
    (0x7FFFFF0, 27),
    (0x3FFFFEE, 26),
    (0x3FFFFFFF, 30),
)

#: Bytes of a dynamic table entry beyond its name and value (RFC 7541 4.1),
#: also counted per field in a header list's size.
ENTRY_OVERHEAD = 32

#: The dynamic table size a decoder starts with (SETTINGS_HEADER_TABLE_SIZE).
DEFAULT_TABLE_SIZE = 4096

# Integers beyond this are no header block's business (and cost a client
# nothing to send as a long run of continuation bytes).
_MAX_INTEGER = 1 << 32
# Header blocks decoded whole are kept up to this many per connection, and
# only up to this size each; Huffman strings and encoded fields up to this
# many per process, of up to this size each (a few MiB at most).
_BLOCK_CACHE = 16
_BLOCK_CACHE_BYTES = 512
_STRING_CACHE = 4096
_FIELD_CACHE = 4096
_CACHED_BYTES = 512

# Names whose fields are sent "never indexed" (RFC 7541 7.1.3): an
# intermediary must not let them into a table it does not control.
_SENSITIVE = frozenset({b"authorization", b"proxy-authorization", b"cookie", b"set-cookie"})


class HPACKError(Exception):
    """A header block that cannot be decoded: a COMPRESSION_ERROR."""


class HeaderListTooLarge(Exception):
    """A header block that decodes to more than the decoder's limit."""


def _build_decoder():
    """
    The Huffman code as a state machine that reads four bits at a time:
    a state is a node of the code's tree (0 the root), and
    C{table[state << 4 | nibble]} is C{(next state, symbol or -1)}, or
    L{None} where the bits spell EOS (an error in a string).  No code is
    shorter than five bits, so a nibble completes at most one symbol.

    :return: the table, and per state whether a string may end there
        (RFC 7541 5.2: the padding is at most 7 bits, all ones).
    """
    children = [[None, None]]
    for sym, (code, length) in enumerate(_HUFFMAN):
        node = 0
        for shift in range(length - 1, -1, -1):
            bit = (code >> shift) & 1
            if shift == 0:
                children[node][bit] = -1 - sym
            else:
                nxt = children[node][bit]
                if nxt is None:
                    nxt = children[node][bit] = len(children)
                    children.append([None, None])
                node = nxt
    accepting = [False] * len(children)
    node, depth = 0, 0
    while node is not None and node >= 0 and depth < 8:
        accepting[node] = True
        node, depth = children[node][1], depth + 1
    table = []
    for state in range(len(children)):
        for nibble in range(16):
            node, sym = state, -1
            for shift in (3, 2, 1, 0):
                nxt = children[node][(nibble >> shift) & 1]
                if nxt < 0:
                    sym = -1 - nxt
                    if sym == 256:
                        break
                    node = 0
                else:
                    node = nxt
            table.append(None if sym == 256 else (node, sym))
    return tuple(table), tuple(accepting)


_DECODE, _ACCEPTING = _build_decoder()
_STRINGS: dict = {}


def huffman_decode(data: bytes) -> bytes:
    """
    Decode a Huffman-coded string (RFC 7541 5.2).

    :raise HPACKError: the string holds EOS, or ends with more than 7 bits
        of padding or with padding that is not the start of EOS.
    """
    table = _DECODE
    out = bytearray()
    state = 0
    try:
        for byte in data:
            state, sym = table[(state << 4) | (byte >> 4)]
            if sym >= 0:
                out.append(sym)
            state, sym = table[(state << 4) | (byte & 15)]
            if sym >= 0:
                out.append(sym)
    except TypeError:
        raise HPACKError("EOS in a Huffman-coded string") from None
    if not _ACCEPTING[state]:
        raise HPACKError("invalid padding of a Huffman-coded string")
    return bytes(out)


def huffman_encode(data: bytes) -> bytes:
    """Huffman-code C{data} (RFC 7541 5.2)."""
    code = _HUFFMAN
    acc = bits = 0
    for byte in data:
        value, length = code[byte]
        acc = (acc << length) | value
        bits += length
    pad = -bits % 8
    return ((acc << pad) | ((1 << pad) - 1)).to_bytes((bits + pad) // 8, "big")


def _huffman_length(data: bytes) -> int:
    code = _HUFFMAN
    return (sum([code[byte][1] for byte in data]) + 7) // 8


def encode_integer(value: int, prefix: int, first: int = 0) -> bytes:
    """
    An integer on a C{prefix}-bit prefix (RFC 7541 5.1), the bits above the
    prefix in the first byte taken from C{first}.
    """
    top = (1 << prefix) - 1
    if value < top:
        return bytes((first | value,))
    out = bytearray((first | top,))
    value -= top
    while value >= 128:
        out.append((value & 127) | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


def _integer(block: bytes, pos: int, value: int) -> tuple[int, int]:
    """
    The rest of an integer whose prefix was all ones (C{value}), from
    C{pos}; returns it and the position after it.
    """
    shift = 0
    while True:
        byte = block[pos]
        pos += 1
        value += (byte & 127) << shift
        if not byte & 128:
            return value, pos
        shift += 7
        if value > _MAX_INTEGER:
            raise HPACKError("integer too large")


def _string(block: bytes, pos: int) -> tuple[bytes, int]:
    """A string literal at C{pos}, and the position after it."""
    first = block[pos]
    length = first & 127
    pos += 1
    if length == 127:
        length, pos = _integer(block, pos, 127)
    end = pos + length
    if end > len(block):
        raise HPACKError("string beyond the end of the header block")
    raw = block[pos:end]
    if not first & 128:
        return raw, end
    text = _STRINGS.get(raw)
    if text is None:
        text = huffman_decode(raw)
        if length <= _CACHED_BYTES:
            if len(_STRINGS) >= _STRING_CACHE:
                _STRINGS.clear()
            _STRINGS[raw] = text
    return text, end


class Decoder:
    """
    The decoding side of one connection's HPACK context.

    :ivar max_header_list_size: decoding stops with L{HeaderListTooLarge}
        beyond this size of the header list (names, values and 32 bytes
        per field, as RFC 7541 counts): an HPACK bomb.
    :ivar max_table_size: the dynamic table size this side allows
        (SETTINGS_HEADER_TABLE_SIZE); size updates above it are errors.
    """

    __slots__ = (
        "max_header_list_size",
        "max_table_size",
        "_table",
        "_size",
        "_max",
        "_gen",
        "_blocks",
    )

    def __init__(
        self, max_header_list_size: int = 1 << 20, max_table_size: int = DEFAULT_TABLE_SIZE
    ):
        self.max_header_list_size = max_header_list_size
        self.max_table_size = max_table_size
        # Newest first: index 62 is _table[0].
        self._table: list = []
        self._size = 0
        self._max = max_table_size
        # Bumped at every change of the dynamic table.
        self._gen = 0
        self._blocks: dict = {}

    @property
    def table(self) -> list:
        """The dynamic table, newest entry first (for tests)."""
        return list(self._table)

    @property
    def table_size(self) -> int:
        """The size of the dynamic table, as RFC 7541 4.1 counts it."""
        return self._size

    def decode(self, block: bytes) -> list:
        """
        Decode a whole header block.

        :return: the header list as C{(name, value)} tuples of bytes;
            callers must not change it (it may be kept for the next block).
        :raise HPACKError: the block is malformed (COMPRESSION_ERROR).
        :raise HeaderListTooLarge: it decodes beyond C{max_header_list_size}.
        """
        hit = self._blocks.get(block)
        if hit is not None and hit[0] == self._gen:
            return hit[1]
        gen = self._gen
        try:
            fields = self._decode(block)
        except IndexError:
            raise HPACKError("header block truncated") from None
        if gen == self._gen and len(block) <= _BLOCK_CACHE_BYTES:
            # Only references to what the table holds now: the same block
            # means the same list as long as the table stays as it is.
            blocks = self._blocks
            if len(blocks) >= _BLOCK_CACHE:
                blocks.clear()
            blocks[block] = (gen, fields)
        return fields

    def _decode(self, block: bytes) -> list:
        fields = []
        append = fields.append
        static = STATIC_TABLE
        table = self._table
        limit = self.max_header_list_size
        size = 0
        pos = 0
        end = len(block)
        while pos < end:
            byte = block[pos]
            pos += 1
            if byte & 128:
                # Indexed field (6.1).
                index = byte & 127
                if index == 127:
                    index, pos = _integer(block, pos, 127)
                if 0 < index <= 61:
                    field = static[index - 1]
                elif index > 61 and index - 62 < len(table):
                    field = table[index - 62]
                else:
                    raise HPACKError("index %d out of range" % (index,))
            elif byte & 64:
                # Literal with incremental indexing (6.2.1).
                field, pos = self._literal(block, pos, byte & 63, 63)
                self._add(field)
                table = self._table
            elif byte & 32:
                # Dynamic table size update (6.3): only before the fields.
                if fields:
                    raise HPACKError("table size update after a header field")
                new = byte & 31
                if new == 31:
                    new, pos = _integer(block, pos, 31)
                if new > self.max_table_size:
                    raise HPACKError("table size update above the limit")
                self._max = new
                self._evict(0)
                self._gen += 1
                continue
            else:
                # Literal without indexing (6.2.2) or never indexed (6.2.3).
                field, pos = self._literal(block, pos, byte & 15, 15)
            size += len(field[0]) + len(field[1]) + ENTRY_OVERHEAD
            if size > limit:
                raise HeaderListTooLarge("header list larger than %d bytes" % (limit,))
            append(field)
        return fields

    def _literal(self, block, pos: int, index: int, mask: int) -> tuple[tuple, int]:
        """
        A literal field (6.2) whose first byte held C{index} under the
        prefix C{mask}: the field, and where the block goes on.
        """
        if index == mask:
            index, pos = _integer(block, pos, mask)
        if index:
            name = self._name(index)
        else:
            name, pos = _string(block, pos)
        value, pos = _string(block, pos)
        return (name, value), pos

    def _name(self, index: int) -> bytes:
        if 0 < index <= 61:
            return STATIC_TABLE[index - 1][0]
        if index > 61 and index - 62 < len(self._table):
            return self._table[index - 62][0]
        raise HPACKError("index %d out of range" % (index,))

    def _add(self, field: tuple) -> None:
        size = len(field[0]) + len(field[1]) + ENTRY_OVERHEAD
        self._gen += 1
        if size > self._max:
            # Larger than the table: it empties it (RFC 7541 4.4).
            self._table = []
            self._size = 0
            return
        self._evict(size)
        self._table.insert(0, field)
        self._size += size

    def _evict(self, room: int) -> None:
        table = self._table
        while table and self._size + room > self._max:
            name, value = table.pop()
            self._size -= len(name) + len(value) + ENTRY_OVERHEAD


def _build_indexes():
    fields = {}
    names = {}
    for index, field in enumerate(STATIC_TABLE, 1):
        fields.setdefault(field, index)
        names.setdefault(field[0], index)
    return fields, names


_STATIC_FIELDS, _STATIC_NAMES = _build_indexes()
_FIELDS: dict = {}


def _encode_string(data: bytes) -> bytes:
    huffman = _huffman_length(data)
    if huffman < len(data):
        return encode_integer(huffman, 7, 128) + huffman_encode(data)
    return encode_integer(len(data), 7) + data


def _encode_field(field: tuple) -> bytes:
    """The representation of one field (see the module docstring)."""
    index = _STATIC_FIELDS.get(field)
    if index is not None:
        return bytes((128 | index,))
    name, value = field
    first = 16 if name in _SENSITIVE else 0
    index = _STATIC_NAMES.get(name)
    if index is not None:
        head = encode_integer(index, 4, first)
    else:
        head = bytes((first,)) + _encode_string(name)
    return head + _encode_string(value)


class Encoder:
    """
    The encoding side of one connection's HPACK context (see the module
    docstring: it never indexes, so it only remembers whether its first
    block, with the size update to 0, was made).
    """

    __slots__ = ("_started",)

    def __init__(self):
        self._started = False

    def encode(self, fields) -> bytes:
        """
        Encode a header list.

        :param fields: C{(name, value)} pairs of bytes, names in lower case.
        """
        cache = _FIELDS
        parts = []
        if not self._started:
            self._started = True
            # The table is not used: say so at once, whatever size the
            # peer allows (RFC 7541 4.2, 6.3).
            parts.append(b"\x20")
        append = parts.append
        for field in fields:
            try:
                data = cache.get(field)
            except TypeError:
                # A list rather than a tuple.
                field = tuple(field)
                data = cache.get(field)
            if data is None:
                field = (field[0], field[1])
                data = _encode_field(field)
                if len(data) <= _CACHED_BYTES:
                    if len(cache) >= _FIELD_CACHE:
                        cache.clear()
                    cache[field] = data
            append(data)
        return b"".join(parts)

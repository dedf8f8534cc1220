"""
Balance's HPACK (L{balance.http.hpack}): the examples of RFC 7541
Appendix C, the errors a decoder must find, and round trips against the
C{hpack} library (hypothesis) both ways.
"""

from __future__ import annotations

import hpack as reference
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from balance.http.hpack import (
    Decoder,
    Encoder,
    HeaderListTooLarge,
    HPACKError,
    encode_integer,
    huffman_decode,
    huffman_encode,
)

DATE_21 = b"Mon, 21 Oct 2013 20:13:21 GMT"
DATE_22 = b"Mon, 21 Oct 2013 20:13:22 GMT"
COOKIE = b"foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"
LOCATION = b"https://www.example.com"

# RFC 7541 C.3 and C.4: the same three requests, without and with Huffman.
REQUESTS = [
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/")]
    + [(b":authority", b"www.example.com")],
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/")]
    + [(b":authority", b"www.example.com"), (b"cache-control", b"no-cache")],
    [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/index.html")]
    + [(b":authority", b"www.example.com"), (b"custom-key", b"custom-value")],
]
REQUEST_SIZES = [57, 110, 164]
C3 = [
    "828684410f7777772e6578616d706c652e636f6d",
    "828684be58086e6f2d6361636865",
    "828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565",
]
C4 = [
    "828684418cf1e3c2e5f23a6ba0ab90f4ff",
    "828684be5886a8eb10649cbf",
    "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf",
]

# RFC 7541 C.5 and C.6: three responses, with a 256-byte table.
RESPONSES = [
    [(b":status", b"302"), (b"cache-control", b"private"), (b"date", DATE_21)]
    + [(b"location", LOCATION)],
    [(b":status", b"307"), (b"cache-control", b"private"), (b"date", DATE_21)]
    + [(b"location", LOCATION)],
    [(b":status", b"200"), (b"cache-control", b"private"), (b"date", DATE_22)]
    + [(b"location", LOCATION), (b"content-encoding", b"gzip"), (b"set-cookie", COOKIE)],
]
RESPONSE_SIZES = [222, 222, 215]
C5 = [
    "4803333032580770726976617465611d4d6f6e2c203231204f637420323031332032303a31333a3231"
    "20474d546e1768747470733a2f2f7777772e6578616d706c652e636f6d",
    "4803333037c1c0bf",
    "88c1611d4d6f6e2c203231204f637420323031332032303a31333a323220474d54c05a04677a69707738"
    "666f6f3d4153444a4b48514b425a584f5157454f50495541585157454f49553b206d61782d6167653d33"
    "3630303b2076657273696f6e3d31",
]
C6 = [
    "488264025885aec3771a4b6196d07abe941054d444a8200595040b8166e082a62d1bff6e919d29ad1718"
    "63c78f0b97c8e9ae82ae43d3",
    "4883640effc1c0bf",
    "88c16196d07abe941054d444a8200595040b8166e084a62d1bffc05a839bd9ab77ad94e7821dd7f2e6c7"
    "b335dfdfcd5b3960d5af27087f3672c1ab270fb5291f9587316065c003ed4ee5b1063d5007",
]


class AppendixCTests(SynchronousTestCase):
    """The examples of RFC 7541 Appendix C decode as the RFC says."""

    def test_integers(self):
        """C.1: 10 and 1337 on a 5-bit prefix, 42 on an 8-bit one."""
        self.assertEqual(encode_integer(10, 5), b"\x0a")
        self.assertEqual(encode_integer(1337, 5), b"\x1f\x9a\x0a")
        self.assertEqual(encode_integer(42, 8), b"\x2a")
        decoder = Decoder()
        # The same integers inside header blocks: index 1337 is out of range.
        with self.assertRaises(HPACKError):
            decoder.decode(b"\xff" + b"\xba\x09")

    def test_literals(self):
        """C.2: one field of each representation."""
        decoder = Decoder()
        block = bytes.fromhex("400a637573746f6d2d6b65790d637573746f6d2d686561646572")
        self.assertEqual(decoder.decode(block), [(b"custom-key", b"custom-header")])
        self.assertEqual(decoder.table_size, 55)
        decoder = Decoder()
        block = bytes.fromhex("040c2f73616d706c652f70617468")
        self.assertEqual(decoder.decode(block), [(b":path", b"/sample/path")])
        self.assertEqual(decoder.table, [])
        block = bytes.fromhex("100870617373776f726406736563726574")
        self.assertEqual(decoder.decode(block), [(b"password", b"secret")])
        self.assertEqual(decoder.table, [])
        self.assertEqual(decoder.decode(b"\x82"), [(b":method", b"GET")])

    def check(self, blocks, expected, sizes, table_size=4096):
        decoder = Decoder(max_table_size=table_size)
        for block, fields, size in zip(blocks, expected, sizes, strict=True):
            self.assertEqual(decoder.decode(bytes.fromhex(block)), fields)
            self.assertEqual(decoder.table_size, size)

    def test_requests(self):
        """C.3: requests without Huffman coding."""
        self.check(C3, REQUESTS, REQUEST_SIZES)

    def test_requests_huffman(self):
        """C.4: requests with Huffman coding."""
        self.check(C4, REQUESTS, REQUEST_SIZES)

    def test_responses(self):
        """C.5: responses without Huffman coding, entries evicted."""
        self.check(C5, RESPONSES, RESPONSE_SIZES, table_size=256)

    def test_responses_huffman(self):
        """C.6: responses with Huffman coding, entries evicted."""
        self.check(C6, RESPONSES, RESPONSE_SIZES, table_size=256)

    def test_huffman_strings(self):
        """The Huffman strings of C.4 and C.6, both ways."""
        for text, hexed in [
            (b"www.example.com", "f1e3c2e5f23a6ba0ab90f4ff"),
            (b"no-cache", "a8eb10649cbf"),
            (b"custom-key", "25a849e95ba97d7f"),
            (b"custom-value", "25a849e95bb8e8b4bf"),
            (b"302", "6402"),
            (b"private", "aec3771a4b"),
            (LOCATION, "9d29ad171863c78f0b97c8e9ae82ae43d3"),
        ]:
            self.assertEqual(huffman_encode(text), bytes.fromhex(hexed))
            self.assertEqual(huffman_decode(bytes.fromhex(hexed)), text)


class DecoderErrorTests(SynchronousTestCase):
    """Malformed header blocks are COMPRESSION_ERRORs (L{HPACKError})."""

    def assert_error(self, block: bytes, decoder=None):
        with self.assertRaises(HPACKError):
            (decoder or Decoder()).decode(block)

    def test_index_zero(self):
        self.assert_error(b"\x80")

    def test_index_out_of_range(self):
        """Index 62 with an empty dynamic table, and beyond the static table."""
        self.assert_error(b"\xbe")
        self.assert_error(b"\x7f\x00\x01a")
        self.assert_error(b"\x0f\x30\x01a")

    def test_truncated(self):
        """A string or an integer that runs past the end of the block."""
        self.assert_error(b"\x40\x05ab")
        self.assert_error(b"\x04\x85\xff")
        self.assert_error(b"\xff")
        self.assert_error(b"\xff\x80\x80")

    def test_integer_too_large(self):
        self.assert_error(b"\xff" + b"\xff" * 10 + b"\x01")

    def test_huffman_eos(self):
        """A string with the EOS symbol (30 ones) in it."""
        self.assert_error(b"\x04\x84\xff\xff\xff\xff")

    def test_huffman_padding(self):
        """Padding longer than 7 bits, or not made of ones."""
        # "a" is 00011: padded with 11 ones over two bytes.
        self.assertEqual(huffman_decode(b"\x1f"), b"a")
        with self.assertRaises(HPACKError):
            huffman_decode(b"\x1f\xff")
        with self.assertRaises(HPACKError):
            huffman_decode(b"\x18")
        self.assert_error(b"\x04\x82\x1f\xff")

    def test_size_update_above_limit(self):
        self.assert_error(b"\x3f\xe2\x1f", Decoder(max_table_size=4096))

    def test_size_update_after_a_field(self):
        self.assert_error(b"\x82\x20")

    def test_size_update_evicts(self):
        """A size update to 0 empties the table; the entries are gone."""
        decoder = Decoder()
        decoder.decode(bytes.fromhex(C3[0]))
        self.assertEqual(decoder.decode(b"\x20\x82"), [(b":method", b"GET")])
        self.assertEqual(decoder.table, [])
        self.assert_error(b"\xbe", decoder)

    def test_entry_larger_than_table(self):
        """An entry larger than the table empties it, and is not added."""
        decoder = Decoder(max_table_size=40)
        decoder.decode(b"\x40\x01a\x01b")
        self.assertEqual(decoder.table, [(b"a", b"b")])
        decoder.decode(b"\x40\x01a\x0a" + b"b" * 10)
        self.assertEqual(decoder.table, [])

    def test_header_list_too_large(self):
        """An HPACK bomb: a small block that decodes far beyond the limit."""
        decoder = Decoder(max_header_list_size=10000)
        block = b"\x40\x01x" + encode_integer(4000, 7) + b"a" * 4000 + b"\xbe" * 100
        with self.assertRaises(HeaderListTooLarge):
            decoder.decode(block)

    def test_cached_blocks_follow_the_table(self):
        """
        A block decoded again after the table changed uses the new entries,
        not the list kept from before.
        """
        decoder = Decoder()
        decoder.decode(b"\x40\x01a\x01b")
        self.assertEqual(decoder.decode(b"\xbe"), [(b"a", b"b")])
        self.assertEqual(decoder.decode(b"\xbe"), [(b"a", b"b")])
        decoder.decode(b"\x40\x01c\x01d")
        self.assertEqual(decoder.decode(b"\xbe"), [(b"c", b"d")])


class EncoderTests(SynchronousTestCase):
    """The encoder's choices, read back by the C{hpack} library."""

    def test_representations(self):
        encoder = Encoder()
        fields = [
            (b":status", b"200"),
            (b"content-type", b"text/plain"),
            (b"x-custom", b"value"),
            (b"set-cookie", b"id=1"),
        ]
        block = encoder.encode(fields)
        # The size update first, then the static index of ":status 200".
        self.assertEqual(block[:2], b"\x20\x88")
        self.assertEqual(reference.Decoder().decode(block, raw=True), fields)
        # Never indexed: the set-cookie field says so to the next hop.
        decoded = reference.Decoder().decode(block, raw=True)
        self.assertIsInstance(decoded[3], reference.NeverIndexedHeaderTuple)
        # No size update after the first block, and no table used.
        second = encoder.encode(fields)
        self.assertEqual(second[:1], b"\x88")
        decoder = reference.Decoder()
        decoder.decode(block, raw=True)
        self.assertEqual(decoder.decode(second, raw=True), fields)
        self.assertEqual(len(decoder.header_table.dynamic_entries), 0)

    def test_lists_as_fields(self):
        """Fields given as lists encode as tuples do."""
        fields = [[b":status", b"200"], [b"x-list", b"yes"]]
        block = Encoder().encode(fields)
        self.assertEqual(
            reference.Decoder().decode(block, raw=True), [(b":status", b"200"), (b"x-list", b"yes")]
        )

    def test_size_update_accepted_at_any_limit(self):
        """A peer that allows no table at all reads the blocks."""
        decoder = reference.Decoder()
        decoder.max_allowed_table_size = 0
        decoder.header_table_size = 0
        fields = [(b":status", b"404"), (b"server", b"x")]
        self.assertEqual(decoder.decode(Encoder().encode(fields), raw=True), fields)


_names = st.one_of(
    st.sampled_from([b":status", b"content-type", b"date", b"set-cookie", b"x-a", b"via"]),
    st.binary(min_size=1, max_size=20),
)
_fields = st.lists(st.tuples(_names, st.binary(max_size=300)), max_size=12)


class RoundTripTests(SynchronousTestCase):
    """Hypothesis: whatever one side encodes, the other decodes the same."""

    @settings(max_examples=300, deadline=None)
    @given(st.lists(_fields, min_size=1, max_size=5))
    def test_ours_to_reference(self, blocks):
        encoder = Encoder()
        decoder = reference.Decoder()
        for fields in blocks:
            self.assertEqual(decoder.decode(encoder.encode(fields), raw=True), fields)

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(_fields, min_size=1, max_size=5),
        st.booleans(),
        st.sampled_from([0, 256, 4096]),
    )
    def test_reference_to_ours(self, blocks, huffman, table_size):
        """With its dynamic table, evictions and size updates."""
        encoder = reference.Encoder()
        encoder.header_table_size = table_size
        decoder = Decoder()
        for fields in blocks:
            block = encoder.encode(fields, huffman=huffman)
            self.assertEqual(decoder.decode(block), fields)
            self.assertEqual(decoder.table_size, encoder.header_table._current_size)

    @settings(max_examples=500, deadline=None)
    @given(st.binary(max_size=200))
    def test_huffman(self, data):
        self.assertEqual(huffman_decode(huffman_encode(data)), data)
        self.assertEqual(
            huffman_decode(
                reference.huffman.HuffmanEncoder(
                    reference.huffman_constants.REQUEST_CODES,
                    reference.huffman_constants.REQUEST_CODES_LENGTH,
                ).encode(data)
            ),
            data,
        )

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=64))
    def test_garbage(self, block):
        """Any bytes decode or fail with L{HPACKError}, never otherwise."""
        try:
            Decoder(max_header_list_size=1 << 16).decode(block)
        except (HPACKError, HeaderListTooLarge):
            pass

"""What kind of audio file some bytes are, read from their first bytes (magic numbers), never
from a file name.

Used twice: the server checks an upload against its declared encoding before libsndfile sees
it, so a file of one kind declared as another (or no audio file at all) is refused with a
message that names what it is; and the client picks the encoding of a local file by its
content, so a recording named .wav that holds MP3 is sent as MP3. Formats people commonly have
but the service does not read (MP4/M4A, AAC, WebM, AMR, ...) are recognised too, so the error
can name them instead of calling them corrupt.

Pure Python on at most the first few kilobytes: no decoding happens here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

SNIFF_BYTES = 4096
"""How much of the start of a file `sniff` needs at most (an ID3 tag is skipped only when it
ends within this much; a longer tag is taken as MP3 by the tag alone)."""


class Container(enum.Enum):
    """The file formats the service reads."""

    WAV = "a WAV file"
    FLAC = "a FLAC file"
    MP3 = "an MP3 file"
    OGG_VORBIS = "an Ogg Vorbis file"
    OGG_OPUS = "an Ogg Opus file"


@dataclass(frozen=True)
class Sniffed:
    """What the first bytes say: a supported container, or (`container` None) a description
    of what they are instead: a format that is not supported, or not audio at all."""

    container: Container | None
    description: str

    @classmethod
    def of(cls, container: Container) -> Sniffed:
        return cls(container, container.value)

    @classmethod
    def unsupported(cls, name: str) -> Sniffed:
        return cls(None, f"{name}, which is not supported")


_UNRECOGNISED = Sniffed(None, "not a recognised audio file")

# Formats that are not read, by their magic bytes at offset 0: say what they are, and that
# they need converting.
_UNSUPPORTED_PREFIXES = (
    (b"\x1a\x45\xdf\xa3", "WebM/Matroska"),
    (b"#!AMR", "AMR"),
    (b"caff", "Core Audio (CAF)"),
    (b".snd", "Sun AU"),
    (b"MThd", "MIDI"),
    (b"wvpk", "WavPack"),
    (b"MAC ", "Monkey's Audio"),
    (b"\x30\x26\xb2\x75\x8e\x66\xcf\x11", "Windows Media (ASF/WMA)"),
)


def sniff(head: bytes) -> Sniffed:
    """What the file starting with `head` (its first SNIFF_BYTES or all of it) is."""
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return Sniffed.of(Container.WAV)
    if head[:4] == b"RF64":
        return Sniffed.unsupported("an RF64 (64-bit WAV) file")
    if len(head) >= 12 and head[:4] == b"RIFF":
        return Sniffed.unsupported(f"a RIFF {head[8:12].decode('latin-1')!r} file")
    if head[:4] == b"fLaC":
        return Sniffed.of(Container.FLAC)
    if head[:4] == b"OggS":
        return _ogg(head)
    if len(head) >= 8 and head[4:8] == b"ftyp":
        return Sniffed.unsupported("an MP4/M4A (AAC or ALAC) file")
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return Sniffed.unsupported("an AIFF file")
    for prefix, name in _UNSUPPORTED_PREFIXES:
        if head.startswith(prefix):
            return Sniffed.unsupported(f"a {name} file")
    if head[:3] == b"ID3":
        return _after_id3(head)
    return _mpeg_frame(head)


def _ogg(head: bytes) -> Sniffed:
    """An Ogg file's first page carries one packet that names its codec (RFC 3533: 27-byte
    page header, then the segment table)."""
    segments = head[26] if len(head) > 26 else 0
    packet = head[27 + segments : 27 + segments + 8]
    if len(packet) < 8:
        return Sniffed(None, "an Ogg file cut short before its codec header")
    if packet.startswith(b"\x01vorbis"):
        return Sniffed.of(Container.OGG_VORBIS)
    if packet.startswith(b"OpusHead"):
        return Sniffed.of(Container.OGG_OPUS)
    if packet.startswith((b"\x7fFLAC", b"fLaC")):
        return Sniffed.unsupported("an Ogg FLAC file")
    if packet.startswith(b"Speex"):
        return Sniffed.unsupported("an Ogg Speex file")
    return Sniffed.unsupported("an Ogg file of another codec than Vorbis or Opus")


def _after_id3(head: bytes) -> Sniffed:
    """An ID3v2 tag precedes MP3 audio (and, rarely, AAC): look past it when it ends within
    `head`. Its size is four 7-bit bytes (syncsafe), not counting the 10-byte header."""
    if len(head) < 10 or any(b & 0x80 for b in head[6:10]):
        return _UNRECOGNISED
    size = 10 + ((head[6] << 21) | (head[7] << 14) | (head[8] << 7) | head[9])
    if head[5] & 0x10:  # a footer follows the tag
        size += 10
    if size + 4 > len(head):
        return Sniffed.of(Container.MP3)
    after = _mpeg_frame(head[size:])
    return after if after != _UNRECOGNISED else Sniffed.of(Container.MP3)


def _mpeg_frame(head: bytes) -> Sniffed:
    """An MPEG audio frame header: 11 sync bits, then version, layer, bitrate and rate fields
    that must not hold their reserved values. Layer bits 00 under the sync are ADTS (AAC)."""
    if len(head) < 4 or head[0] != 0xFF or head[1] & 0xE0 != 0xE0:
        return _UNRECOGNISED
    version = (head[1] >> 3) & 0x03
    layer = (head[1] >> 1) & 0x03
    if layer == 0:
        return (
            Sniffed.unsupported("an AAC (ADTS) file") if head[1] & 0xF6 == 0xF0 else _UNRECOGNISED
        )
    bitrate = head[2] >> 4
    rate = (head[2] >> 2) & 0x03
    if version == 1 or bitrate in (0, 15) or rate == 3:
        return _UNRECOGNISED
    return Sniffed.of(Container.MP3)

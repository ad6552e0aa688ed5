"""What a compressed image says about itself, read from its headers without decoding it.

A decoder allocates for the size the compressed data declares, not for the size its container
(a DICOM header, a file extension) claims: a 1 kB JPEG frame whose header says 65000 x 65000
makes the decoder ask for gigabytes. dicom.py and data.py read these headers first and decode
only what they checked:

- JPEG (ISO 10918: baseline, extended, progressive, lossless) and JPEG-LS (ISO 14495, SOF55):
  the frame header (SOF) gives width, height, components and precision.
- JPEG 2000 (ISO 15444, also HTJ2K), as a bare codestream or in a JP2 file: the SIZ segment.
- DICOM RLE (PS3.5 annex G): the segment table, and how many bytes each segment decodes to.

Decoders also fill in what is missing: libjpeg pads a JPEG cut short (or one whose header claims
more pixels than its data hold) with gray, and OpenJPEG decodes a cut JPEG 2000 codestream at a
lower quality, both without an error. `ends_complete` and `most_pixels` catch that before decoding.
"""

from __future__ import annotations

from dataclasses import dataclass


class CodestreamError(ValueError):
    """The compressed data's own header is missing, cut short or inconsistent."""


@dataclass(frozen=True)
class FrameHeader:
    width: int
    height: int
    components: int
    precision: int  # bits per sample
    marker: int = 0  # JPEG only: which SOF (0xC0 baseline ... 0xF7 JPEG-LS)
    scan_start: int = 0  # JPEG only: where the first scan (SOS) begins


# --------------------------------------------------------------------------------------------
# JPEG and JPEG-LS
# --------------------------------------------------------------------------------------------

# Start-of-frame markers: C0-C3 and C5-C7 Huffman, C9-CB and CD-CF arithmetic, F7 JPEG-LS.
SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}
# Baseline, extended and progressive with Huffman coding: every 8x8 block of every scan costs at
# least one bit, so the coded data bound the pixel count (data.py relies on this).
HUFFMAN_DCT_MARKERS = {0xC0, 0xC1, 0xC2}
START_OF_SCAN, END_OF_IMAGE = 0xDA, 0xD9
# Markers without a length field: TEM and the restart markers RST0-RST7.
STANDALONE_MARKERS = {0x01, *range(0xD0, 0xD8)}
# Real files carry a handful of segments before the first scan; this many means a crafted file.
MAX_SEGMENTS = 4096


def jpeg_header(data) -> FrameHeader:
    """The frame header of a JPEG or JPEG-LS stream (bytes or mmap), and where its first scan starts."""
    if bytes(data[:2]) != b"\xff\xd8":
        raise CodestreamError("the JPEG data does not start with a start-of-image marker")
    position, frame = 2, None
    for _ in range(MAX_SEGMENTS):
        if position + 4 > len(data):
            break
        if data[position] != 0xFF:
            raise CodestreamError(f"the JPEG data has no marker where one belongs (byte {position})")
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker in STANDALONE_MARKERS:
            position += 2
            continue
        if marker == END_OF_IMAGE:
            break
        length = int.from_bytes(data[position + 2:position + 4], "big")
        if length < 2:
            raise CodestreamError(f"the JPEG data has a marker segment of impossible length {length}")
        if marker in SOF_MARKERS:
            if frame is not None:
                raise CodestreamError("the JPEG data has two frame headers")
            if length < 8 or position + 10 > len(data):
                raise CodestreamError("the JPEG frame header is cut short")
            segment = data[position + 4:position + 10]
            frame = dict(precision=segment[0], height=int.from_bytes(segment[1:3], "big"),
                         width=int.from_bytes(segment[3:5], "big"), components=segment[5], marker=marker)
        elif marker == START_OF_SCAN:
            if frame is None:
                break
            return FrameHeader(**frame, scan_start=position)
        position += 2 + length
    else:
        raise CodestreamError(f"the JPEG data has more than {MAX_SEGMENTS} segments before its image data")
    raise CodestreamError("the JPEG data has no frame header before its image data")


# The fewest pixels one byte of Huffman-coded DCT data can carry: a sequential scan codes every
# 8x8 block with at least a DC code and an end-of-block code, 1 bit or more each (64 pixels per
# 2 bits); a progressive image's first (DC) scan spends at least a bit on every block.
PIXELS_PER_CODED_BYTE = {0xC0: 256, 0xC1: 256, 0xC2: 512}


def most_pixels(header: FrameHeader, coded_bytes: int) -> int | None:
    """The most pixels `coded_bytes` of scan data can hold under this frame's coding; None where
    the coding has no such bound (arithmetic coding, lossless JPEG, JPEG-LS runs)."""
    per_byte = PIXELS_PER_CODED_BYTE.get(header.marker)
    return None if per_byte is None else coded_bytes * per_byte


MAX_PADDING = 4  # zero bytes after the end marker: each wrapping may pad to even length


def ends_complete(data) -> bool:
    """Whether a JPEG, JPEG-LS or JPEG 2000 stream ends with its end marker (EOI, or EOC for
    JPEG 2000: both FF D9), allowing the zero bytes that pad a DICOM frame (and a codestream
    inside it) to even length. A stream cut anywhere loses it: in coded data, FF is never
    followed by D9."""
    end = len(data)
    while end and len(data) - end < MAX_PADDING and data[end - 1] == 0:
        end -= 1
    return end >= 2 and bytes(data[end - 2:end]) == b"\xff\xd9"


# --------------------------------------------------------------------------------------------
# JPEG 2000
# --------------------------------------------------------------------------------------------

J2K_START = b"\xff\x4f\xff\x51"  # SOC, then SIZ: a codestream must begin with both
JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


def j2k_header(data) -> FrameHeader:
    """The image size of a JPEG 2000 codestream, bare or inside a JP2 file (its `jp2c` box)."""
    data = bytes(data[:1 << 16]) if bytes(data[:4]) == J2K_START else _jp2_codestream(data)
    if data[:4] != J2K_START:
        raise CodestreamError("the JPEG 2000 data does not start with SOC and SIZ markers")
    if len(data) < 4 + 38 + 3:
        raise CodestreamError("the JPEG 2000 size segment (SIZ) is cut short")

    def u32(offset: int) -> int:
        return int.from_bytes(data[offset:offset + 4], "big")

    # SIZ after its marker: Lsiz(2) Rsiz(2) Xsiz Ysiz XOsiz YOsiz XTsiz YTsiz XTOsiz YTOsiz (4 each) Csiz(2)
    width, height = u32(8) - u32(16), u32(12) - u32(20)
    components = int.from_bytes(data[40:42], "big")
    if width <= 0 or height <= 0 or components < 1:
        raise CodestreamError(f"the JPEG 2000 size segment gives an empty image ({width} x {height}, "
                              f"{components} components)")
    sizes = data[42:42 + 3 * components:3]
    if len(sizes) < components:
        raise CodestreamError("the JPEG 2000 size segment (SIZ) is cut short")
    return FrameHeader(width, height, components, max((s & 0x7F) + 1 for s in sizes))


def _jp2_codestream(data) -> bytes:
    if bytes(data[:12]) != JP2_SIGNATURE:
        raise CodestreamError("the data is neither a JPEG 2000 codestream nor a JP2 file")
    position = 12
    for _ in range(MAX_SEGMENTS):
        if position + 8 > len(data):
            break
        length, kind = int.from_bytes(data[position:position + 4], "big"), bytes(data[position + 4:position + 8])
        header = 8
        if length == 1:  # a 64-bit length follows
            length, header = int.from_bytes(data[position + 8:position + 16], "big"), 16
        elif length == 0:  # the box runs to the end
            length = len(data) - position
        if kind == b"jp2c":
            return bytes(data[position + header:position + header + (1 << 16)])
        if length < header:
            raise CodestreamError(f"the JP2 file has a box of impossible length {length}")
        position += length
    raise CodestreamError("the JP2 file holds no codestream (jp2c box)")


# --------------------------------------------------------------------------------------------
# DICOM RLE
# --------------------------------------------------------------------------------------------

def rle_segments(frame: bytes) -> list[bytes]:
    """The segments of one RLE frame, from its 64-byte header (segment count, then offsets)."""
    if len(frame) < 64:
        raise CodestreamError("the RLE frame is shorter than its 64-byte header")
    count = int.from_bytes(frame[:4], "little")
    offsets = [int.from_bytes(frame[4 + 4 * i:8 + 4 * i], "little") for i in range(min(count, 15))]
    if not 1 <= count <= 15:
        raise CodestreamError(f"the RLE header announces {count} segments (1 to 15 possible)")
    bounds = [*offsets, len(frame)]
    if offsets[0] != 64 or any(b <= a for a, b in zip(bounds, bounds[1:])):
        raise CodestreamError("the RLE header's segment offsets are out of order or outside the frame")
    return [frame[a:b] for a, b in zip(bounds, bounds[1:])]


def rle_decoded_length(segment: bytes, limit: int) -> int:
    """How many bytes an RLE (PackBits) segment decodes to, counting no further than past `limit`.

    pydicom's decoder appends whatever the runs say and checks the length afterwards; a run of
    two bytes can say 128, so a crafted segment decodes to 64 times its size. This counts first."""
    position, decoded = 0, 0
    while position < len(segment) and decoded <= limit:
        header = segment[position]
        if header < 128:  # the next header + 1 bytes, literally
            decoded += min(header + 1, len(segment) - position - 1)
            position += header + 2
        elif header > 128:  # the next byte, 257 - header times
            decoded += 257 - header if position + 1 < len(segment) else 0
            position += 2
        else:  # 128: no operation
            position += 1
    return decoded

//! Header-only inspection of uploaded images: the real format (PNG, JPEG or WebP, by signature), the claimed
//! width and height, the colour kind and whether the image can carry transparency; and [`check_end`], whether
//! the file also ends like a whole file of its format (looking at its last [`TAIL_WINDOW`] bytes only).
//!
//! This module owns reading image *headers* (and ends) and nothing more. It never decodes pixel data, never allocates
//! anything proportional to the claimed dimensions and does a bounded amount of work on any input: the PNG chunk
//! walk stops after [`MAX_PNG_CHUNKS`] chunks, the JPEG marker walk after [`MAX_JPEG_STEPS`] steps, and WebP only
//! reads its first chunk. Hostile input yields [`InspectError`], never a panic. Dimensions are reported as the
//! file claims them; refusing absurd sizes is the caller's job (see `docs/validation.md`, section "Files").

/// At most this many PNG chunks after `IHDR` are looked at when searching for `tRNS`.
pub const MAX_PNG_CHUNKS: usize = 64;

/// At most this many JPEG steps (markers, fill bytes or stray bytes) are taken before giving up on finding `SOF`.
pub const MAX_JPEG_STEPS: usize = 4096;

const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
const JPEG_SIGNATURE: [u8; 3] = [0xFF, 0xD8, 0xFF];

/// An image format imagegate accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Png,
    Jpeg,
    Webp,
}

impl ImageFormat {
    /// The canonical media type.
    pub fn mime(self) -> &'static str {
        match self {
            Self::Png => "image/png",
            Self::Jpeg => "image/jpeg",
            Self::Webp => "image/webp",
        }
    }

    /// The usual file extension, without the dot.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg => "jpg",
            Self::Webp => "webp",
        }
    }

    /// The human-readable name used in messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Png => "PNG",
            Self::Jpeg => "JPEG",
            Self::Webp => "WebP",
        }
    }

    /// The format an upload's declared media type names, as strictly as OpenAI reads it: exactly
    /// `image/png`, `image/jpeg` or `image/webp` (media types are case-insensitive; parameters such as
    /// `; charset=…` are ignored). `image/jpg` is not a registered type and OpenAI does not list it: `None`.
    pub fn from_declared(mime: &str) -> Option<Self> {
        let essence = mime.split(';').next().unwrap_or_default().trim();
        [Self::Png, Self::Jpeg, Self::Webp].into_iter().find(|f| essence.eq_ignore_ascii_case(f.mime()))
    }

    /// The format a media type from elsewhere (an image host's `Content-Type`) names: `image/png`,
    /// `image/jpeg` (or the common misspelling `image/jpg`), `image/webp`; case-insensitive, parameters
    /// (`; charset=…`) ignored. Uploads are read with the stricter [`Self::from_declared`].
    pub fn from_mime(mime: &str) -> Option<Self> {
        let essence = mime.split(';').next().unwrap_or_default().trim();
        if essence.eq_ignore_ascii_case("image/png") {
            Some(Self::Png)
        } else if essence.eq_ignore_ascii_case("image/jpeg") || essence.eq_ignore_ascii_case("image/jpg") {
            Some(Self::Jpeg)
        } else if essence.eq_ignore_ascii_case("image/webp") {
            Some(Self::Webp)
        } else {
            None
        }
    }
}

/// The colour layout the header declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColorKind {
    Gray,
    GrayAlpha,
    Rgb,
    Rgba,
    Palette,
    /// Anything else (for example a 4-component CMYK JPEG).
    Other,
}

/// What the header of an image says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: ImageFormat,
    pub width: u32,
    pub height: u32,
    pub color: ColorKind,
    /// An alpha channel, or (PNG) a `tRNS` chunk before the image data, or (WebP) the alpha flag.
    pub has_alpha: bool,
}

/// Why [`inspect`] could not read an image header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InspectError {
    #[error("the bytes are not a PNG, JPEG or WebP image")]
    Unrecognized,
    #[error("the {0} header is truncated or corrupt")]
    Corrupt(&'static str),
    /// The header is fine but the file does not end the way a complete file of its format ends.
    #[error("the {0} file is truncated ({1})")]
    Truncated(&'static str, &'static str),
}

/// The format the leading bytes (the signature) name, without reading any further.
pub fn sniff(bytes: &[u8]) -> Option<ImageFormat> {
    sniff_source(bytes)
}

fn sniff_source<S: Source + ?Sized>(bytes: &S) -> Option<ImageFormat> {
    if array_at(bytes, 0) == Some(PNG_SIGNATURE) {
        Some(ImageFormat::Png)
    } else if array_at(bytes, 0) == Some(JPEG_SIGNATURE) {
        Some(ImageFormat::Jpeg)
    } else if array_at(bytes, 0) == Some(*b"RIFF") && array_at(bytes, 8) == Some(*b"WEBP") {
        Some(ImageFormat::Webp)
    } else {
        None
    }
}

/// Bytes the header readers look at: one slice, or a file held in several chunks ([`Chunked`]), read in
/// place either way.
pub trait Source {
    /// How many bytes there are.
    fn size(&self) -> usize;
    /// Copy the `out.len()` bytes at `at` into `out`; `false` (and `out` unspecified) when they are not all
    /// there.
    fn read_at(&self, at: usize, out: &mut [u8]) -> bool;
}

impl Source for [u8] {
    fn size(&self) -> usize {
        self.len()
    }

    fn read_at(&self, at: usize, out: &mut [u8]) -> bool {
        match at.checked_add(out.len()).and_then(|end| self.get(at..end)) {
            Some(bytes) => {
                out.copy_from_slice(bytes);
                true
            }
            None => false,
        }
    }
}

/// A file held as several chunks, read as if it were one slice (no copy of the file is made).
pub struct Chunked<'a> {
    chunks: &'a [bytes::Bytes],
    /// Where each chunk starts in the file.
    starts: Vec<usize>,
    size: usize,
}

impl<'a> Chunked<'a> {
    pub fn new(chunks: &'a [bytes::Bytes]) -> Self {
        let mut starts = Vec::with_capacity(chunks.len());
        let mut size = 0usize;
        for chunk in chunks {
            starts.push(size);
            size = size.saturating_add(chunk.len());
        }
        Self { chunks, starts, size }
    }
}

impl Source for Chunked<'_> {
    fn size(&self) -> usize {
        self.size
    }

    fn read_at(&self, at: usize, out: &mut [u8]) -> bool {
        if at.checked_add(out.len()).is_none_or(|end| end > self.size) {
            return false;
        }
        // The chunk holding `at`: the last one starting at or before it (empty chunks are skipped over).
        let mut index = self.starts.partition_point(|&start| start <= at).saturating_sub(1);
        let (mut at, mut written) = (at, 0);
        while written < out.len() {
            let Some(chunk) = self.chunks.get(index) else { return false };
            let offset = at - self.starts[index];
            let n = chunk.len().saturating_sub(offset).min(out.len() - written);
            out[written..written + n].copy_from_slice(&chunk[offset..offset + n]);
            written += n;
            at += n;
            index += 1;
        }
        true
    }
}

/// Read the header of a PNG, JPEG or WebP image. Bounded work, constant memory, never panics.
pub fn inspect(bytes: &[u8]) -> Result<ImageInfo, InspectError> {
    inspect_source(bytes)
}

/// [`inspect`] of bytes held as a slice or in chunks ([`Source`]).
pub fn inspect_source<S: Source + ?Sized>(bytes: &S) -> Result<ImageInfo, InspectError> {
    match sniff_source(bytes) {
        Some(ImageFormat::Png) => inspect_png(bytes).ok_or(InspectError::Corrupt(ImageFormat::Png.name())),
        Some(ImageFormat::Jpeg) => inspect_jpeg(bytes).ok_or(InspectError::Corrupt(ImageFormat::Jpeg.name())),
        Some(ImageFormat::Webp) => inspect_webp(bytes).ok_or(InspectError::Corrupt(ImageFormat::Webp.name())),
        None => Err(InspectError::Unrecognized),
    }
}

/// How many bytes at the end of a file [`check_end`] looks at: room for trailing padding after the end marker.
pub const TAIL_WINDOW: usize = 1024;

/// The PNG end: an empty `IEND` chunk (length 0, type, CRC).
const PNG_IEND: [u8; 12] = [0, 0, 0, 0, b'I', b'E', b'N', b'D', 0xAE, 0x42, 0x60, 0x82];
const JPEG_EOI: [u8; 2] = [0xFF, 0xD9];

/// Whether a whole file whose header [`inspect`] read as `format` also ends like a complete file: see
/// [`check_end`]. Constant work: only the first 12 and the last [`TAIL_WINDOW`] bytes are looked at.
pub fn check_complete(bytes: &[u8], format: ImageFormat) -> Result<(), InspectError> {
    let tail = &bytes[bytes.len().saturating_sub(TAIL_WINDOW)..];
    check_end(bytes, tail, bytes.len() as u64, format)
}

/// The end-of-file checks without decoding anything, given the file's first bytes (`head`, at least 12 for
/// WebP), its last bytes (`tail`, up to [`TAIL_WINDOW`]) and its length: a PNG has an `IEND` chunk in its
/// tail (anything after it is ignored, as decoders do); a JPEG has an end-of-image marker `FF D9` in its tail
/// (trailing padding allowed); a WebP's RIFF size fits in the length. A file cut short after an intact
/// header fails here.
pub fn check_end<S: Source + ?Sized>(head: &S, tail: &[u8], len: u64, format: ImageFormat) -> Result<(), InspectError> {
    let tail = &tail[tail.len().saturating_sub(TAIL_WINDOW)..];
    let ok = match format {
        ImageFormat::Png => tail.windows(PNG_IEND.len()).any(|w| w[..8] == PNG_IEND[..8]),
        ImageFormat::Jpeg => len > 4 && tail.windows(JPEG_EOI.len()).any(|w| w == JPEG_EOI),
        ImageFormat::Webp => le_u32(head, 4).is_some_and(|size| u64::from(size) + 8 <= len),
    };
    if ok {
        return Ok(());
    }
    Err(InspectError::Truncated(
        format.name(),
        match format {
            ImageFormat::Png => "it does not end with an IEND chunk",
            ImageFormat::Jpeg => "it does not end with an end-of-image marker",
            ImageFormat::Webp => "it is shorter than its RIFF header says",
        },
    ))
}

fn byte_at<S: Source + ?Sized>(bytes: &S, at: usize) -> Option<u8> {
    array_at::<1, S>(bytes, at).map(|[b]| b)
}

fn array_at<const N: usize, S: Source + ?Sized>(bytes: &S, at: usize) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    bytes.read_at(at, &mut out).then_some(out)
}

fn be_u16<S: Source + ?Sized>(bytes: &S, at: usize) -> Option<u16> {
    array_at(bytes, at).map(u16::from_be_bytes)
}

fn be_u32<S: Source + ?Sized>(bytes: &S, at: usize) -> Option<u32> {
    array_at(bytes, at).map(u32::from_be_bytes)
}

fn le_u16<S: Source + ?Sized>(bytes: &S, at: usize) -> Option<u16> {
    array_at(bytes, at).map(u16::from_le_bytes)
}

fn le_u24<S: Source + ?Sized>(bytes: &S, at: usize) -> Option<u32> {
    let [a, b, c] = array_at(bytes, at)?;
    Some(u32::from_le_bytes([a, b, c, 0]))
}

fn le_u32<S: Source + ?Sized>(bytes: &S, at: usize) -> Option<u32> {
    array_at(bytes, at).map(u32::from_le_bytes)
}

/// PNG: signature, `IHDR` first (length 13), then a bounded walk over chunk headers looking for `tRNS` before
/// `IDAT`. CRCs are not checked.
fn inspect_png<S: Source + ?Sized>(bytes: &S) -> Option<ImageInfo> {
    // Signature (0..8), IHDR length (8..12), type (12..16), data (16..29), CRC (29..33).
    if be_u32(bytes, 8)? != 13 || array_at(bytes, 12)? != *b"IHDR" {
        return None;
    }
    let width = be_u32(bytes, 16)?;
    let height = be_u32(bytes, 20)?;
    let bit_depth = byte_at(bytes, 24)?;
    let color_type = byte_at(bytes, 25)?;
    if width == 0 || height == 0 {
        return None;
    }
    let (color, depth_ok) = match color_type {
        0 => (ColorKind::Gray, matches!(bit_depth, 1 | 2 | 4 | 8 | 16)),
        2 => (ColorKind::Rgb, matches!(bit_depth, 8 | 16)),
        3 => (ColorKind::Palette, matches!(bit_depth, 1 | 2 | 4 | 8)),
        4 => (ColorKind::GrayAlpha, matches!(bit_depth, 8 | 16)),
        6 => (ColorKind::Rgba, matches!(bit_depth, 8 | 16)),
        _ => return None,
    };
    if !depth_ok {
        return None;
    }
    let has_alpha = matches!(color, ColorKind::GrayAlpha | ColorKind::Rgba) || png_has_trns(bytes, 33);
    Some(ImageInfo { format: ImageFormat::Png, width, height, color, has_alpha })
}

/// Walk chunk headers from `start` by their length fields without reading their data. Stops at `IDAT`/`IEND`,
/// after [`MAX_PNG_CHUNKS`] chunks, or where the buffer ends (a truncated chunk just ends the walk).
fn png_has_trns<S: Source + ?Sized>(bytes: &S, start: usize) -> bool {
    let mut pos = start;
    for _ in 0..MAX_PNG_CHUNKS {
        let (Some(length), Some(kind)) = (be_u32(bytes, pos), array_at::<4, S>(bytes, pos.saturating_add(4))) else {
            return false;
        };
        match &kind {
            b"tRNS" => return true,
            b"IDAT" | b"IEND" => return false,
            _ => {}
        }
        // Length, type, data, CRC.
        let next = usize::try_from(length).ok().and_then(|len| len.checked_add(12)).and_then(|n| pos.checked_add(n));
        match next {
            Some(next) if next <= bytes.size() => pos = next,
            _ => return false,
        }
    }
    false
}

/// JPEG: walk markers from offset 2 to the first start-of-frame marker, skipping segments by their length.
/// Fill bytes (`FF FF`), standalone markers (`TEM`, `RSTn`, a repeated `SOI`) and stray non-marker bytes are
/// stepped over; every step counts against [`MAX_JPEG_STEPS`]. `SOS` or `EOI` before a frame header is corrupt.
fn inspect_jpeg<S: Source + ?Sized>(bytes: &S) -> Option<ImageInfo> {
    let mut pos: usize = 2;
    for _ in 0..MAX_JPEG_STEPS {
        if byte_at(bytes, pos)? != 0xFF {
            // A stray byte between segments: tolerated (as common decoders do) within the step budget.
            pos = pos.checked_add(1)?;
            continue;
        }
        let marker = byte_at(bytes, pos.checked_add(1)?)?;
        match marker {
            // Fill byte: the marker starts at the next 0xFF.
            0xFF => pos = pos.checked_add(1)?,
            // A stuffed zero or a standalone marker carries no length.
            0x00 | 0x01 | 0xD0..=0xD8 => pos = pos.checked_add(2)?,
            // End of image or start of scan before any frame header.
            0xD9 | 0xDA => return None,
            0xC0..=0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => return jpeg_frame(bytes, pos.checked_add(2)?),
            _ => {
                let length = be_u16(bytes, pos.checked_add(2)?)?;
                if length < 2 {
                    return None;
                }
                pos = pos.checked_add(2)?.checked_add(usize::from(length))?;
            }
        }
    }
    None
}

/// A frame header at `at`: length (2), precision (1), height (2), width (2), components (1).
fn jpeg_frame<S: Source + ?Sized>(bytes: &S, at: usize) -> Option<ImageInfo> {
    let length = be_u16(bytes, at)?;
    let height = be_u16(bytes, at.checked_add(3)?)?;
    let width = be_u16(bytes, at.checked_add(5)?)?;
    let components = byte_at(bytes, at.checked_add(7)?)?;
    if length < 8 || width == 0 || height == 0 || components == 0 {
        return None;
    }
    let color = match components {
        1 => ColorKind::Gray,
        3 => ColorKind::Rgb,
        _ => ColorKind::Other,
    };
    Some(ImageInfo { format: ImageFormat::Jpeg, width: width.into(), height: height.into(), color, has_alpha: false })
}

/// WebP: `RIFF` size `WEBP`, then the first chunk is `VP8 ` (lossy), `VP8L` (lossless) or `VP8X` (extended).
fn inspect_webp<S: Source + ?Sized>(bytes: &S) -> Option<ImageInfo> {
    const DATA: usize = 20; // RIFF header (12) + chunk FourCC (4) + chunk size (4).
    let kind: [u8; 4] = array_at(bytes, 12)?;
    let (width, height, has_alpha) = match &kind {
        b"VP8 " => {
            // Frame tag (3 bytes, bit 0 clear for a key frame), start code 9D 01 2A, then 14-bit width and
            // height each followed by a 2-bit scale.
            let tag = byte_at(bytes, DATA)?;
            if tag & 1 != 0 || array_at::<3, S>(bytes, DATA + 3)? != [0x9D, 0x01, 0x2A] {
                return None;
            }
            let width = le_u16(bytes, DATA + 6)? & 0x3FFF;
            let height = le_u16(bytes, DATA + 8)? & 0x3FFF;
            (u32::from(width), u32::from(height), false)
        }
        b"VP8L" => {
            // Signature 0x2F, then 14 bits width-1, 14 bits height-1, 1 bit alpha_is_used, 3 bits version (0).
            if byte_at(bytes, DATA)? != 0x2F {
                return None;
            }
            let bits = le_u32(bytes, DATA + 1)?;
            if bits >> 29 != 0 {
                return None;
            }
            ((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, (bits >> 28) & 1 == 1)
        }
        b"VP8X" => {
            // Flags (alpha = 0x10), 3 reserved bytes, 24-bit canvas width-1 and height-1.
            let flags = byte_at(bytes, DATA)?;
            let width = le_u24(bytes, DATA + 4)?.checked_add(1)?;
            let height = le_u24(bytes, DATA + 7)?.checked_add(1)?;
            (width, height, flags & 0x10 != 0)
        }
        _ => return None,
    };
    if width == 0 || height == 0 {
        return None;
    }
    let color = if has_alpha { ColorKind::Rgba } else { ColorKind::Rgb };
    Some(ImageInfo { format: ImageFormat::Webp, width, height, color, has_alpha })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use std::io::Cursor;

    use image::{DynamicImage, ImageEncoder};
    use proptest::prelude::*;

    use super::*;

    fn encode(img: &DynamicImage, format: image::ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        out.extend_from_slice(&[0xDE, 0xAD, 0xBE, 0xEF]); // dummy CRC: the parser never checks it
        out
    }

    fn ihdr(width: u32, height: u32, depth: u8, color: u8) -> Vec<u8> {
        let mut data = Vec::new();
        data.extend_from_slice(&width.to_be_bytes());
        data.extend_from_slice(&height.to_be_bytes());
        data.extend_from_slice(&[depth, color, 0, 0, 0]);
        chunk(b"IHDR", &data)
    }

    fn png(chunks: &[Vec<u8>]) -> Vec<u8> {
        let mut out = PNG_SIGNATURE.to_vec();
        for c in chunks {
            out.extend_from_slice(c);
        }
        out
    }

    fn riff(chunk_kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
        let mut out = b"RIFF".to_vec();
        out.extend_from_slice(&u32::try_from(12 + data.len()).unwrap().to_le_bytes());
        out.extend_from_slice(b"WEBP");
        out.extend_from_slice(chunk_kind);
        out.extend_from_slice(&u32::try_from(data.len()).unwrap().to_le_bytes());
        out.extend_from_slice(data);
        out
    }

    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    /// The invariants every input must satisfy: no panic, and `inspect` agrees with `sniff`.
    fn check_consistent(bytes: &[u8]) {
        let sniffed = sniff(bytes);
        match inspect(bytes) {
            Ok(info) => {
                assert_eq!(Some(info.format), sniffed);
                assert!(info.width > 0 && info.height > 0);
            }
            Err(InspectError::Unrecognized) => assert_eq!(sniffed, None),
            Err(InspectError::Corrupt(name)) => assert_eq!(Some(name), sniffed.map(ImageFormat::name)),
            Err(e @ InspectError::Truncated(..)) => panic!("inspect reads headers only, yet said {e}"),
        }
        if let Some(format) = sniffed {
            // Never panics, whatever the bytes.
            let _ = check_complete(bytes, format);
        }
    }

    fn sample_png() -> Vec<u8> {
        encode(&DynamicImage::new_rgba8(7, 5), image::ImageFormat::Png)
    }

    fn sample_jpeg() -> Vec<u8> {
        encode(&DynamicImage::new_rgb8(7, 5), image::ImageFormat::Jpeg)
    }

    fn sample_webp() -> Vec<u8> {
        encode(&DynamicImage::new_rgba8(7, 5), image::ImageFormat::WebP)
    }

    #[test]
    fn mime_and_name_round_trip() {
        for format in [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::Webp] {
            assert_eq!(ImageFormat::from_mime(format.mime()), Some(format));
        }
        assert_eq!(ImageFormat::Png.name(), "PNG");
        assert_eq!(ImageFormat::Jpeg.name(), "JPEG");
        assert_eq!(ImageFormat::Webp.name(), "WebP");
        assert_eq!(ImageFormat::Webp.mime(), "image/webp");
    }

    #[test]
    fn from_mime_is_lenient_about_case_parameters_and_jpg() {
        assert_eq!(ImageFormat::from_mime("IMAGE/PNG"), Some(ImageFormat::Png));
        assert_eq!(ImageFormat::from_mime(" image/jpeg ; charset=binary"), Some(ImageFormat::Jpeg));
        assert_eq!(ImageFormat::from_mime("image/jpg"), Some(ImageFormat::Jpeg));
        assert_eq!(ImageFormat::from_mime("Image/WebP;q=1"), Some(ImageFormat::Webp));
        assert_eq!(ImageFormat::from_mime("image/gif"), None);
        assert_eq!(ImageFormat::from_mime("application/octet-stream"), None);
        assert_eq!(ImageFormat::from_mime(""), None);
        assert_eq!(ImageFormat::from_mime("image/pngx"), None);
    }

    #[test]
    fn declared_upload_types_are_the_three_openai_lists() {
        assert_eq!(ImageFormat::from_declared("image/png"), Some(ImageFormat::Png));
        assert_eq!(ImageFormat::from_declared("IMAGE/JPEG; charset=binary"), Some(ImageFormat::Jpeg));
        assert_eq!(ImageFormat::from_declared("image/webp"), Some(ImageFormat::Webp));
        for no in ["image/jpg", "image/pjpeg", "image/x-png", "image/gif", "application/octet-stream", "", "image/"] {
            assert_eq!(ImageFormat::from_declared(no), None, "{no}");
        }
    }

    #[test]
    fn encoded_pngs_match_their_color_types() {
        for (w, h) in [(1, 1), (3, 2), (64, 17), (256, 256), (1000, 3)] {
            let cases = [
                (DynamicImage::new_rgb8(w, h), ColorKind::Rgb, false),
                (DynamicImage::new_rgba8(w, h), ColorKind::Rgba, true),
                (DynamicImage::new_luma8(w, h), ColorKind::Gray, false),
                (DynamicImage::new_luma_a8(w, h), ColorKind::GrayAlpha, true),
                (DynamicImage::new_rgb16(w, h), ColorKind::Rgb, false),
            ];
            for (img, color, has_alpha) in cases {
                let bytes = encode(&img, image::ImageFormat::Png);
                let info = inspect(&bytes).unwrap();
                assert_eq!(
                    info,
                    ImageInfo { format: ImageFormat::Png, width: w, height: h, color, has_alpha },
                    "{w}x{h} {color:?}"
                );
            }
        }
    }

    #[test]
    fn encoded_jpegs_report_size_and_components() {
        for (w, h) in [(1, 1), (3, 2), (64, 17), (300, 200), (17, 1000)] {
            let info = inspect(&encode(&DynamicImage::new_rgb8(w, h), image::ImageFormat::Jpeg)).unwrap();
            assert_eq!(
                info,
                ImageInfo { format: ImageFormat::Jpeg, width: w, height: h, color: ColorKind::Rgb, has_alpha: false }
            );
            let gray = inspect(&encode(&DynamicImage::new_luma8(w, h), image::ImageFormat::Jpeg)).unwrap();
            assert_eq!((gray.width, gray.height, gray.color), (w, h, ColorKind::Gray));
        }
    }

    #[test]
    fn encoded_lossless_webps_report_alpha() {
        for (w, h) in [(1, 1), (3, 2), (64, 17), (300, 200), (16384, 1)] {
            let rgb = inspect(&encode(&DynamicImage::new_rgb8(w, h), image::ImageFormat::WebP)).unwrap();
            assert_eq!(
                rgb,
                ImageInfo { format: ImageFormat::Webp, width: w, height: h, color: ColorKind::Rgb, has_alpha: false }
            );
            let rgba = inspect(&encode(&DynamicImage::new_rgba8(w, h), image::ImageFormat::WebP)).unwrap();
            assert_eq!(
                rgba,
                ImageInfo { format: ImageFormat::Webp, width: w, height: h, color: ColorKind::Rgba, has_alpha: true }
            );
        }
    }

    #[test]
    fn encoded_extended_webp_uses_the_vp8x_canvas() {
        // An ICC profile makes the encoder write a VP8X header (with the alpha flag for RGBA).
        for (color, has_alpha) in [(image::ExtendedColorType::Rgba8, true), (image::ExtendedColorType::Rgb8, false)] {
            let (w, h) = (33u32, 9u32);
            let pixels = vec![0u8; usize::try_from(w * h).unwrap() * usize::from(color.bits_per_pixel() / 8)];
            let mut out = Vec::new();
            let mut encoder = image::codecs::webp::WebPEncoder::new_lossless(&mut out);
            encoder.set_icc_profile(vec![0; 16]).unwrap();
            encoder.write_image(&pixels, w, h, color).unwrap();
            assert_eq!(out.get(12..16), Some(&b"VP8X"[..]));
            let info = inspect(&out).unwrap();
            assert_eq!((info.width, info.height, info.has_alpha), (w, h, has_alpha));
        }
    }

    #[test]
    fn handmade_vp8x_with_alpha_flag() {
        let mut data = vec![0x10, 0, 0, 0];
        data.extend_from_slice(&(4999u32.to_le_bytes()[..3]));
        data.extend_from_slice(&(16_777_215u32.to_le_bytes()[..3]));
        let info = inspect(&riff(b"VP8X", &data)).unwrap();
        assert_eq!(
            info,
            ImageInfo {
                format: ImageFormat::Webp,
                width: 5000,
                height: 16_777_216,
                color: ColorKind::Rgba,
                has_alpha: true
            }
        );
        data[0] = 0x08; // EXIF only, no alpha
        assert!(!inspect(&riff(b"VP8X", &data)).unwrap().has_alpha);
    }

    #[test]
    fn handmade_lossy_vp8_header() {
        // Key-frame tag, start code, 640 (scale bits set, ignored) x 480.
        let mut data = vec![0x10, 0x02, 0x00, 0x9D, 0x01, 0x2A];
        data.extend_from_slice(&(640u16 | 0x4000).to_le_bytes());
        data.extend_from_slice(&480u16.to_le_bytes());
        let info = inspect(&riff(b"VP8 ", &data)).unwrap();
        assert_eq!(
            info,
            ImageInfo { format: ImageFormat::Webp, width: 640, height: 480, color: ColorKind::Rgb, has_alpha: false }
        );
        let mut bad_start = data.clone();
        bad_start[4] = 0x02;
        assert_eq!(inspect(&riff(b"VP8 ", &bad_start)), Err(InspectError::Corrupt("WebP")));
        let mut zero = data;
        zero[6] = 0;
        zero[7] = 0x40; // width 0 with a scale
        assert_eq!(inspect(&riff(b"VP8 ", &zero)), Err(InspectError::Corrupt("WebP")));
    }

    #[test]
    fn webp_with_unknown_first_chunk_or_bad_vp8l_is_corrupt() {
        assert_eq!(inspect(&riff(b"ALPH", &[0; 16])), Err(InspectError::Corrupt("WebP")));
        assert_eq!(inspect(&riff(b"VP8L", &[0x2E, 0, 0, 0, 0])), Err(InspectError::Corrupt("WebP")));
        // Version bits set.
        assert_eq!(inspect(&riff(b"VP8L", &[0x2F, 0, 0, 0, 0x20])), Err(InspectError::Corrupt("WebP")));
    }

    #[test]
    fn palette_png_with_trns_has_alpha() {
        let plte = chunk(b"PLTE", &[0, 0, 0, 255, 255, 255]);
        let idat = chunk(b"IDAT", &[0; 8]);
        let iend = chunk(b"IEND", &[]);
        let with = png(&[ihdr(40, 30, 8, 3), plte.clone(), chunk(b"tRNS", &[0]), idat.clone(), iend.clone()]);
        assert_eq!(
            inspect(&with).unwrap(),
            ImageInfo { format: ImageFormat::Png, width: 40, height: 30, color: ColorKind::Palette, has_alpha: true }
        );
        let without = png(&[ihdr(40, 30, 8, 3), plte.clone(), idat.clone(), iend.clone()]);
        assert!(!inspect(&without).unwrap().has_alpha);
        // A tRNS after the image data does not count.
        let late = png(&[ihdr(40, 30, 8, 3), plte, idat, chunk(b"tRNS", &[0]), iend]);
        assert!(!inspect(&late).unwrap().has_alpha);
        // Gray and RGB can carry tRNS too.
        let gray = png(&[ihdr(2, 2, 16, 0), chunk(b"tRNS", &[0, 0])]);
        assert_eq!(inspect(&gray).unwrap().color, ColorKind::Gray);
        assert!(inspect(&gray).unwrap().has_alpha);
    }

    #[test]
    fn png_chunk_walk_is_bounded_and_tolerates_truncation() {
        let mut chunks = vec![ihdr(8, 8, 8, 2)];
        chunks.extend((0..MAX_PNG_CHUNKS).map(|_| chunk(b"tEXt", b"k\0v")));
        chunks.push(chunk(b"tRNS", &[0; 6]));
        assert!(!inspect(&png(&chunks)).unwrap().has_alpha, "tRNS beyond the chunk budget is not seen");
        chunks.drain(1..2);
        assert!(inspect(&png(&chunks)).unwrap().has_alpha, "tRNS within the budget is seen");

        // A chunk whose length runs past the buffer ends the walk without an error.
        let mut huge = png(&[ihdr(8, 8, 8, 2)]);
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        huge.extend_from_slice(b"zTXt");
        huge.extend_from_slice(&chunk(b"tRNS", &[0; 6]));
        let info = inspect(&huge).unwrap();
        assert_eq!((info.width, info.height, info.has_alpha), (8, 8, false));
    }

    #[test]
    fn tiny_png_claiming_huge_dimensions_inspects_fine() {
        let mut chunks = vec![ihdr(100_000, 100_000, 8, 6)];
        chunks.push(chunk(b"tEXt", &[b'x'; 1000]));
        let bytes = png(&chunks);
        assert!(bytes.len() < 1100);
        assert_eq!(
            inspect(&bytes).unwrap(),
            ImageInfo {
                format: ImageFormat::Png,
                width: 100_000,
                height: 100_000,
                color: ColorKind::Rgba,
                has_alpha: true
            }
        );
        // IHDR alone (no CRC even) is enough, and u32::MAX is reported as claimed.
        let bare = png(&[ihdr(u32::MAX, 1, 8, 0)]);
        assert_eq!(inspect(&bare[..29]).unwrap().width, u32::MAX);
    }

    #[test]
    fn png_with_bad_ihdr_is_corrupt() {
        let corrupt = Err(InspectError::Corrupt("PNG"));
        assert_eq!(inspect(&png(&[ihdr(0, 5, 8, 2)])), corrupt);
        assert_eq!(inspect(&png(&[ihdr(5, 0, 8, 2)])), corrupt);
        assert_eq!(inspect(&png(&[ihdr(5, 5, 8, 5)])), corrupt, "unknown color type");
        assert_eq!(inspect(&png(&[ihdr(5, 5, 4, 6)])), corrupt, "RGBA at 4 bits");
        assert_eq!(inspect(&png(&[ihdr(5, 5, 16, 3)])), corrupt, "palette at 16 bits");
        assert_eq!(inspect(&png(&[chunk(b"tEXt", &[0; 13]), ihdr(5, 5, 8, 2)])), corrupt, "IHDR not first");
        let mut long = png(&[ihdr(5, 5, 8, 2)]);
        long[11] = 14; // IHDR length 14
        assert_eq!(inspect(&long), corrupt);
    }

    #[test]
    fn handmade_jpeg_with_fill_bytes_restart_markers_and_progressive_frame() {
        let mut bytes = vec![0xFF, 0xD8];
        bytes.extend_from_slice(&[0xFF, 0xE0, 0x00, 0x04, 0xAA, 0xBB]); // APP0 with 2 data bytes
        bytes.extend_from_slice(&[0xFF, 0xD0, 0xFF, 0x01]); // RST0, TEM
        bytes.extend_from_slice(&[0xFF, 0xFE, 0x00, 0x02]); // empty COM
        bytes.extend_from_slice(&[0xFF, 0xFF, 0xFF]); // fill bytes before the next marker
        bytes.extend_from_slice(&[0xC2, 0x00, 0x11, 0x08, 0x01, 0x2C, 0x02, 0x58, 0x04]); // SOF2 600x300, 4 comps
        let info = inspect(&bytes).unwrap();
        assert_eq!(
            info,
            ImageInfo { format: ImageFormat::Jpeg, width: 600, height: 300, color: ColorKind::Other, has_alpha: false }
        );
    }

    #[test]
    fn jpeg_without_frame_header_is_corrupt() {
        let corrupt = Err(InspectError::Corrupt("JPEG"));
        // SOS before SOF.
        assert_eq!(inspect(&[0xFF, 0xD8, 0xFF, 0xDA, 0x00, 0x02, 0x00]), corrupt);
        // EOI.
        assert_eq!(inspect(&[0xFF, 0xD8, 0xFF, 0xD9]), corrupt);
        // Segment length below 2.
        assert_eq!(inspect(&[0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x01, 0xFF, 0xD9]), corrupt);
        // Segment length running past the end.
        assert_eq!(inspect(&[0xFF, 0xD8, 0xFF, 0xE1, 0xFF, 0xFF, 0x00]), corrupt);
        // Zero width.
        assert_eq!(inspect(&[0xFF, 0xD8, 0xFF, 0xC0, 0x00, 0x11, 0x08, 0x00, 0x10, 0x00, 0x00, 0x03]), corrupt);
        // DHT (C4), JPG (C8) and DAC (CC) are not frame headers.
        assert_eq!(inspect(&[0xFF, 0xD8, 0xFF, 0xC4, 0x00, 0x11, 0x08, 0x00, 0x10, 0x00, 0x10, 0x03]), corrupt);
    }

    #[test]
    fn jpeg_marker_walk_is_bounded() {
        // Many empty COM segments, then a valid SOF: beyond the step budget it is not reached.
        let mut bytes = vec![0xFF, 0xD8];
        for _ in 0..MAX_JPEG_STEPS {
            bytes.extend_from_slice(&[0xFF, 0xFE, 0x00, 0x02]);
        }
        bytes.extend_from_slice(&[0xFF, 0xC0, 0x00, 0x11, 0x08, 0x00, 0x10, 0x00, 0x10, 0x03]);
        assert_eq!(inspect(&bytes), Err(InspectError::Corrupt("JPEG")));
        // So are long runs of fill bytes.
        let mut fill = vec![0xFF; 1 << 20];
        fill[1] = 0xD8;
        assert_eq!(inspect(&fill), Err(InspectError::Corrupt("JPEG")));
    }

    #[test]
    fn truncated_headers_never_panic() {
        for (name, bytes) in [("PNG", sample_png()), ("JPEG", sample_jpeg()), ("WebP", sample_webp())] {
            let full = inspect(&bytes).unwrap();
            for len in 0..=40.min(bytes.len()) {
                let prefix = &bytes[..len];
                check_consistent(prefix);
                match inspect(prefix) {
                    Err(InspectError::Unrecognized) => assert!(len < 12, "{name} prefix of {len} bytes"),
                    Err(InspectError::Corrupt(corrupt)) => assert_eq!(corrupt, name),
                    Err(e @ InspectError::Truncated(..)) => panic!("{name} prefix of {len} bytes: {e}"),
                    // A prefix that holds the whole header reads the same as the full file.
                    Ok(info) => assert_eq!(info, full, "{name} prefix of {len} bytes"),
                }
            }
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let prefixes: [&[u8]; 5] =
            [&[], &PNG_SIGNATURE, &JPEG_SIGNATURE, b"RIFF\0\0\0\0WEBPVP8", b"RIFF\0\0\0\0WEBPVP8X"];
        let mut buf = Vec::with_capacity(600);
        for seed in 1..=3000u64 {
            let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let len = usize::try_from(xorshift(&mut state) % 512).unwrap();
            for prefix in prefixes {
                buf.clear();
                buf.extend_from_slice(prefix);
                buf.extend((0..len).map(|_| xorshift(&mut state).to_le_bytes()[0]));
                check_consistent(&buf);
            }
        }
    }

    #[test]
    fn mutated_real_images_never_panic() {
        for original in [sample_png(), sample_jpeg(), sample_webp()] {
            for seed in 1..=500u64 {
                let mut state = seed.wrapping_mul(0xD1B5_4A32_D192_ED03) | 1;
                let mut bytes = original.clone();
                for _ in 0..(xorshift(&mut state) % 4 + 1) {
                    let at = usize::try_from(xorshift(&mut state) % 48).unwrap() % bytes.len();
                    bytes[at] = xorshift(&mut state).to_le_bytes()[0];
                }
                check_consistent(&bytes);
            }
        }
    }

    #[test]
    fn format_comes_from_bytes_not_labels() {
        let png = sample_png();
        // Whatever the upload was labelled, the signature decides.
        assert_eq!(ImageFormat::from_mime("image/jpeg"), Some(ImageFormat::Jpeg));
        assert_eq!(sniff(&png), Some(ImageFormat::Png));
        assert_eq!(inspect(&png).unwrap().format, ImageFormat::Png);
        assert_eq!(sniff(&sample_jpeg()), Some(ImageFormat::Jpeg));
        assert_eq!(sniff(&sample_webp()), Some(ImageFormat::Webp));
        assert_eq!(sniff(b"GIF89a\x01\x00\x01\x00"), None);
        assert_eq!(inspect(b"GIF89a\x01\x00\x01\x00"), Err(InspectError::Unrecognized));
        assert_eq!(sniff(b"RIFF\0\0\0\0WAVEfmt "), None);
        assert_eq!(inspect(&[]), Err(InspectError::Unrecognized));
    }

    #[test]
    fn complete_files_pass_the_end_checks_and_truncated_ones_do_not() {
        for (format, bytes) in
            [(ImageFormat::Png, sample_png()), (ImageFormat::Jpeg, sample_jpeg()), (ImageFormat::Webp, sample_webp())]
        {
            assert_eq!(check_complete(&bytes, format), Ok(()), "{format:?}");
            // Trailing padding after the end is ignored, as decoders ignore it.
            let mut padded = bytes.clone();
            padded.extend_from_slice(&[0; 100]);
            assert_eq!(check_complete(&padded, format), Ok(()), "{format:?} padded");
            // Cut anywhere after the header: the header still reads, the end check fails.
            for cut in [40, bytes.len() / 2, bytes.len() - 1] {
                let prefix = &bytes[..cut.min(bytes.len() - 1)];
                assert!(
                    matches!(check_complete(prefix, format), Err(InspectError::Truncated(name, _)) if name == format.name()),
                    "{format:?} cut at {cut}"
                );
            }
        }
        // The first 40 bytes of a PNG: an intact header, nothing else.
        let png = sample_png();
        assert!(inspect(&png[..40]).is_ok());
        assert_eq!(
            check_complete(&png[..40], ImageFormat::Png).unwrap_err().to_string(),
            "the PNG file is truncated (it does not end with an IEND chunk)"
        );
    }

    #[test]
    fn the_end_checks_look_only_at_the_tail_window() {
        // A PNG whose IEND is followed by more than the window of junk no longer looks complete.
        let mut png = sample_png();
        png.extend(std::iter::repeat_n(7u8, TAIL_WINDOW));
        assert!(check_complete(&png, ImageFormat::Png).is_err());
        // A JPEG end marker far from the end does not count either.
        let mut jpeg = sample_jpeg();
        jpeg.extend(std::iter::repeat_n(0u8, TAIL_WINDOW + 1));
        assert!(check_complete(&jpeg, ImageFormat::Jpeg).is_err());
        // WebP: the RIFF size must fit the length exactly or with trailing bytes.
        let webp = sample_webp();
        let (head, tail) = (&webp[..12], &webp[webp.len() - 8..]);
        assert_eq!(check_end(head, tail, webp.len() as u64, ImageFormat::Webp), Ok(()));
        assert!(check_end(head, tail, webp.len() as u64 - 1, ImageFormat::Webp).is_err());
        assert!(check_end(&head[..6], tail, webp.len() as u64, ImageFormat::Webp).is_err());
    }

    /// A file held in chunks reads exactly as the same bytes in one slice, wherever it is cut: the header
    /// readers and the end checks give the same answers, valid files and broken ones alike.
    #[test]
    fn a_file_in_chunks_inspects_as_in_one_slice() {
        let plte = chunk(b"PLTE", &[0, 0, 0, 255, 255, 255]);
        let trns_png = png(&[ihdr(40, 30, 8, 3), chunk(b"tEXt", &[7; 3000]), plte, chunk(b"tRNS", &[0])]);
        let mut files = vec![sample_png(), sample_jpeg(), sample_webp(), trns_png, b"RIFF\0\0\0\0WEBP".to_vec()];
        let cut_short: Vec<Vec<u8>> = files.iter().map(|f| f[..f.len() / 2].to_vec()).collect();
        files.extend(cut_short);
        for file in &files {
            for size in [1, 2, 3, 5, 7, 64, 1000, 4096] {
                let chunks: Vec<bytes::Bytes> = file.chunks(size).map(bytes::Bytes::copy_from_slice).collect();
                let chunked = Chunked::new(&chunks);
                assert_eq!(chunked.size(), file.len());
                let whole = inspect(file);
                assert_eq!(inspect_source(&chunked), whole, "cut every {size} bytes");
                if let Ok(info) = whole {
                    let tail = &file[file.len().saturating_sub(TAIL_WINDOW)..];
                    let len = file.len() as u64;
                    assert_eq!(
                        check_end(&chunked, tail, len, info.format),
                        check_end(&file[..], tail, len, info.format)
                    );
                }
                let mut out = [0u8; 9];
                for at in [0, 1, size.saturating_sub(1), size, file.len().saturating_sub(9), file.len()] {
                    let expected = file.get(at..at + 9);
                    assert_eq!(chunked.read_at(at, &mut out), expected.is_some(), "at {at}");
                    if let Some(expected) = expected {
                        assert_eq!(&out[..], expected, "at {at}");
                    }
                }
            }
        }
    }

    #[test]
    fn error_messages() {
        assert_eq!(InspectError::Unrecognized.to_string(), "the bytes are not a PNG, JPEG or WebP image");
        assert_eq!(InspectError::Corrupt("WebP").to_string(), "the WebP header is truncated or corrupt");
    }

    proptest! {
        #[test]
        fn prop_any_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..=512)) {
            check_consistent(&bytes);
        }

        #[test]
        fn prop_valid_png_header_with_garbage_inspects(
            width in 1u32..,
            height in 1u32..,
            color in proptest::sample::select(vec![0u8, 2, 3, 4, 6]),
            tail in proptest::collection::vec(any::<u8>(), 0..=512),
        ) {
            let mut bytes = png(&[ihdr(width, height, 8, color)]);
            bytes.extend_from_slice(&tail);
            check_consistent(&bytes);
            let info = inspect(&bytes).unwrap();
            prop_assert_eq!((info.format, info.width, info.height), (ImageFormat::Png, width, height));
            if color == 4 || color == 6 {
                prop_assert!(info.has_alpha);
            }
        }
    }
}

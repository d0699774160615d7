//! A JSON answer read as it arrives, with the base64 of its `data[].b64_json` images decoded on the way: what is
//! kept is the answer without that text (a few hundred bytes: `""` where each image's megabytes were) and the
//! decoded images with their SHA-256, never the text itself.
//!
//! Re-hosting a GPT image model's answer for a caller who asked for links needs the images, not their base64:
//! read whole, 32 answers of 2.7 MB in flight held 2.7 MB of text each until their decode, and then the 2 MB
//! image beside it (docs/performance.md). Read through a [`Splitter`], each holds its image only; through a
//! spilling one ([`Splitter::spilling`]), a block of it, handed on to disk as it is decoded.
//!
//! The splitter recognises only what a plain reading of the answer names so: a string value under the key
//! `b64_json` of an object that is an element of the array under the top-level key `data`, keys written
//! without escapes. Every other byte is kept as it came, so whatever it does not recognise (an escaped key, an
//! answer that is not JSON) is still in the skeleton for a whole-text reader to find. [`ImageDecoder`] is the
//! one base64 decoder of re-hosting, also for base64 that arrives whole.

use base64_simd::STANDARD as BASE64;
use bytes::Bytes;
use sha2::Digest as _;

/// Base64 characters decoded at a time: a multiple of 4 (whole groups), 48 KiB of image, small enough to be
/// hashed while it is still in the CPU's cache.
const BLOCK: usize = 64 * 1024;

/// Decoded bytes a spilling decoder hands out at a time ([`Splitter::spilling`]): big enough that whoever
/// takes them (a staging file's writer) queues each as it is instead of gathering small ones by copying.
const SPILL_BLOCK: usize = 128 * 1024;

/// A spilling decoder's buffer: a block, and room for the decode that passes it (no reallocation).
const SPILL_CAPACITY: usize = SPILL_BLOCK + BLOCK / 4 * 3;

/// One decoded image and its SHA-256 (the store's content address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    pub bytes: Bytes,
    pub sha256: [u8; 32],
}

/// One image of an answer read through a [`Splitter`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Image {
    /// Decoded into memory, whole.
    Decoded(Decoded),
    /// Handed out block by block as it was decoded ([`Splitter::take_spilled`]), under `slot` (the splitter
    /// numbers images in the order they begin; a repeated `data` or `b64_json` begins a new one); `sha256`
    /// of all its blocks.
    Spilled { slot: usize, sha256: [u8; 32] },
}

/// An answer read through a [`Splitter`].
#[derive(Debug)]
pub struct Split {
    /// The answer as it came, except that each decoded `b64_json` string is empty (`""`).
    pub skeleton: Bytes,
    /// Each decoded image by the index of its item in `data[]`, in that order; `None` where the text was not
    /// base64 (refused exactly as decoding it whole refuses it). When `data` came more than once, the images
    /// of the last one (a JSON reader keeps the last value of a repeated key); of an item's repeated
    /// `b64_json`, the last.
    pub images: Vec<(usize, Option<Image>)>,
}

impl Split {
    /// A body read whole: nothing decoded from it yet.
    pub fn whole(body: Bytes) -> Self {
        Self { skeleton: body, images: Vec::new() }
    }
}

/// Base64 decoded as it arrives, a block at a time, each block hashed as it is decoded (while it is in the
/// CPU's cache); spilling, handed out in blocks of [`SPILL_BLOCK`] as it is decoded instead of kept.
pub struct ImageDecoder {
    staged: Vec<u8>,
    out: Vec<u8>,
    hasher: sha2::Sha256,
    bad: bool,
    /// Spilling: the decoded blocks not yet taken (`None`: the image is kept whole in `out`).
    ready: Option<Vec<Bytes>>,
}

impl ImageDecoder {
    /// A decoder whose image buffer is reserved for `bytes` (more is allocated if more comes).
    pub fn with_capacity(bytes: usize) -> Self {
        Self {
            staged: Vec::new(),
            out: Vec::with_capacity(bytes),
            hasher: sha2::Sha256::new(),
            bad: false,
            ready: None,
        }
    }

    /// A decoder that hands its image out block by block ([`ImageDecoder::take_ready`]) instead of keeping it.
    pub fn spilling() -> Self {
        Self { ready: Some(Vec::new()), ..Self::with_capacity(SPILL_CAPACITY) }
    }

    /// Spilling: the blocks decoded since the last call.
    pub fn take_ready(&mut self) -> Vec<Bytes> {
        self.ready.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Spilling: the text is over; the blocks not taken yet, the last one included, and the SHA-256 of the
    /// whole image, or `None` when the text was not base64 (what was handed out already is then no image).
    pub fn finish_spilled(mut self) -> Option<(Vec<Bytes>, [u8; 32])> {
        let staged = std::mem::take(&mut self.staged);
        self.decode(&staged, true);
        if self.bad {
            return None;
        }
        let mut ready = self.ready.unwrap_or_default();
        if !self.out.is_empty() {
            ready.push(Bytes::from(self.out));
        }
        Some((ready, self.hasher.finalize().into()))
    }

    /// More base64 text. A block is decoded only once text after it is known to exist, so that padding
    /// (`=`) is accepted at the very end of the text only, as a whole decode accepts it.
    pub fn push(&mut self, mut text: &[u8]) {
        while !self.bad && !text.is_empty() {
            if self.staged.len() == BLOCK {
                let staged = std::mem::take(&mut self.staged);
                self.decode(&staged, false);
                self.staged = staged;
                self.staged.clear();
            }
            if self.staged.is_empty() && text.len() > BLOCK {
                // Whole blocks straight from the text, no staging copy.
                let (block, rest) = text.split_at(BLOCK);
                self.decode(block, false);
                text = rest;
                continue;
            }
            if self.staged.capacity() == 0 {
                self.staged.reserve_exact(BLOCK);
            }
            let take = (BLOCK - self.staged.len()).min(text.len());
            self.staged.extend_from_slice(&text[..take]);
            text = &text[take..];
        }
    }

    /// Mark the text as not base64 (a character no base64 has, such as an escape that is not one).
    pub fn refuse(&mut self) {
        self.bad = true;
    }

    /// The image and its SHA-256, or `None` when the text was not base64.
    pub fn finish(mut self) -> Option<Decoded> {
        let staged = std::mem::take(&mut self.staged);
        self.decode(&staged, true);
        if self.bad {
            return None;
        }
        // Grown without a known length (it doubles): not kept at up to twice its size.
        if self.out.capacity() - self.out.len() > self.out.len() / 8 {
            self.out.shrink_to_fit();
        }
        Some(Decoded { bytes: Bytes::from(self.out), sha256: self.hasher.finalize().into() })
    }

    fn decode(&mut self, block: &[u8], last: bool) {
        if self.bad {
            return;
        }
        // Padding belongs at the very end only; a block before the last that ends with it would decode alone.
        if !last && block.ends_with(b"=") {
            self.bad = true;
            return;
        }
        // Appended into the spare capacity as it is decoded (no zero-filling of megabytes first). Reserved
        // here with `Vec`'s doubling: the decoder reserves exactly, which without a known length would
        // reallocate (and copy) the image once per block.
        self.out.reserve(block.len() / 4 * 3);
        let start = self.out.len();
        match BASE64.decode_append(block, &mut self.out) {
            Ok(()) => {
                self.hasher.update(&self.out[start..]);
                if let Some(ready) = &mut self.ready
                    && self.out.len() >= SPILL_BLOCK
                {
                    let full = std::mem::replace(&mut self.out, Vec::with_capacity(SPILL_CAPACITY));
                    ready.push(Bytes::from(full));
                }
            }
            Err(_) => self.bad = true,
        }
    }
}

/// Where the splitter is in the answer's structure: the objects and arrays it is inside, up to the depth of
/// an item's fields (deeper ones are only counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frame {
    Object { key: Key, expect_key: bool },
    Array { index: usize },
}

/// The key of an object's current member, as far as the splitter cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Data,
    B64Json,
    Other,
}

/// What the splitter is reading.
enum Lex {
    /// Between strings: structure, numbers, literals, whitespace.
    Between,
    /// A key: its first bytes (enough to tell `data` and `b64_json`), whether it had escapes, and whether the
    /// next byte is escaped.
    Key { name: [u8; 8], len: usize, plain: bool, escaped: bool },
    /// A string kept as it is; `escaped`: the next byte is escaped.
    Text { escaped: bool },
    /// An image's base64, decoded as it comes.
    Image(Box<ImageText>),
}

struct ImageText {
    index: usize,
    /// Spilling: the image's slot ([`Image::Spilled`]).
    slot: usize,
    decoder: ImageDecoder,
    escape: Escape,
}

/// An escape inside base64 text: JSON may write `/` as `\/` or any ASCII character as `\u00XX`; every other
/// escape stands for a character base64 does not have.
#[derive(Clone, Copy)]
enum Escape {
    None,
    Backslash,
    Unicode { digits: u8, value: u32 },
}

/// Reads an answer chunk by chunk into a [`Split`].
pub struct Splitter {
    skeleton: Vec<u8>,
    frames: Vec<Frame>,
    /// Objects and arrays open beyond `frames`.
    deeper: usize,
    lex: Lex,
    images: Vec<(usize, Option<Image>)>,
    /// Spilling ([`Splitter::spilling`]): the images ended so far (the next one's slot: images do not nest),
    /// and the blocks of ended ones not taken yet.
    spill: Option<(usize, Vec<(usize, Bytes)>)>,
    /// The answer's declared length, if it declared one: the room reserved for an image is what is left of
    /// it after the image's opening quote.
    declared: Option<usize>,
    /// Bytes of the answer consumed before the current step of [`Splitter::feed`].
    read: usize,
}

impl Splitter {
    /// A splitter for an answer of `declared` bytes, when its length is known.
    pub fn new(declared: Option<usize>) -> Self {
        Self {
            skeleton: Vec::with_capacity(1024),
            frames: Vec::with_capacity(3),
            deeper: 0,
            lex: Lex::Between,
            images: Vec::new(),
            spill: None,
            declared,
            read: 0,
        }
    }

    /// A splitter that hands each image out block by block as it is decoded ([`Splitter::take_spilled`]),
    /// never holding more than a block of it: for images written to disk as the answer arrives.
    pub fn spilling(declared: Option<usize>) -> Self {
        Self { spill: Some((0, Vec::new())), ..Self::new(declared) }
    }

    /// Spilling: the blocks decoded since the last call, each with its image's slot, in order.
    pub fn take_spilled(&mut self) -> Vec<(usize, Bytes)> {
        let Some((_, ended)) = &mut self.spill else { return Vec::new() };
        let mut blocks = std::mem::take(ended);
        if let Lex::Image(image) = &mut self.lex {
            let slot = image.slot;
            blocks.extend(image.decoder.take_ready().into_iter().map(|block| (slot, block)));
        }
        blocks
    }

    /// The next bytes of the answer.
    pub fn feed(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() {
            let used = match &mut self.lex {
                Lex::Between => self.between(chunk),
                Lex::Text { escaped } => {
                    let (used, ended) = text(chunk, escaped);
                    self.skeleton.extend_from_slice(&chunk[..used]);
                    if ended {
                        self.lex = Lex::Between;
                    }
                    used
                }
                Lex::Key { .. } => self.key(chunk),
                Lex::Image(_) => self.image(chunk),
            };
            chunk = &chunk[used..];
            self.read += used;
        }
    }

    /// The answer read: its skeleton and its images.
    pub fn finish(mut self) -> Split {
        // An answer cut off inside an image's text: what came of it is decoded (and, cut off, most likely
        // refused) so that the skeleton and the images still say where the text was.
        if let Lex::Image(image) = std::mem::replace(&mut self.lex, Lex::Between) {
            if self.spill.is_some() {
                // Its blocks can no longer be taken: refused, not handed on short.
                self.set_image(image.index, None);
            } else {
                self.end_image(*image);
            }
        }
        Split { skeleton: Bytes::from(self.skeleton), images: self.images }
    }

    /// Structure between strings, up to and including the opening quote of the next string.
    fn between(&mut self, chunk: &[u8]) -> usize {
        for (i, &b) in chunk.iter().enumerate() {
            self.skeleton.push(b);
            match b {
                b'{' | b'[' => {
                    if self.deeper > 0 || self.frames.len() == 3 {
                        self.deeper += 1;
                    } else if b == b'{' {
                        self.frames.push(Frame::Object { key: Key::Other, expect_key: true });
                    } else {
                        self.frames.push(Frame::Array { index: 0 });
                    }
                }
                b'}' | b']' => {
                    if self.deeper > 0 {
                        self.deeper -= 1;
                    } else {
                        self.frames.pop();
                    }
                }
                b',' if self.deeper == 0 => match self.frames.last_mut() {
                    Some(Frame::Object { key, expect_key }) => {
                        *key = Key::Other;
                        *expect_key = true;
                    }
                    Some(Frame::Array { index }) => *index += 1,
                    None => {}
                },
                b':' if self.deeper == 0 => {
                    if let Some(Frame::Object { expect_key, .. }) = self.frames.last_mut() {
                        *expect_key = false;
                    }
                }
                b'"' => {
                    self.lex = self.string_at_this_point(self.read + i + 1);
                    return i + 1;
                }
                _ => {}
            }
        }
        chunk.len()
    }

    /// What the string whose text begins at byte `at` of the answer is: a key, an image's base64, or other text.
    fn string_at_this_point(&self, at: usize) -> Lex {
        if self.deeper > 0 {
            return Lex::Text { escaped: false };
        }
        match self.frames.as_slice() {
            [.., Frame::Object { expect_key: true, .. }] => {
                Lex::Key { name: [0; 8], len: 0, plain: true, escaped: false }
            }
            [
                Frame::Object { key: Key::Data, .. },
                Frame::Array { index },
                Frame::Object { key: Key::B64Json, expect_key: false },
            ] => {
                let (slot, decoder) = match &self.spill {
                    // Spilling: a block at a time, whatever the image's size.
                    Some((ended, _)) => (*ended, ImageDecoder::spilling()),
                    // Room for the image this text is, when the answer's length is known: the rest of the
                    // answer as base64 decoded, a few hundred bytes over for the envelope that follows. (Less,
                    // and the image's buffer would double as it fills: twice the memory, and a copy.)
                    None => {
                        let room = self.declared.map_or(BLOCK, |d| d.saturating_sub(at) / 4 * 3);
                        (0, ImageDecoder::with_capacity(room))
                    }
                };
                Lex::Image(Box::new(ImageText { index: *index, slot, decoder, escape: Escape::None }))
            }
            _ => Lex::Text { escaped: false },
        }
    }

    /// A key's bytes, kept as they came; at its closing quote, the key the current member has.
    fn key(&mut self, chunk: &[u8]) -> usize {
        let Lex::Key { name, len, plain, escaped } = &mut self.lex else { return 0 };
        let (used, ended) = text(chunk, escaped);
        let body = &chunk[..used - usize::from(ended)];
        if body.contains(&b'\\') {
            *plain = false;
        }
        for &b in body {
            if *len < name.len() {
                name[*len] = b;
            }
            *len += 1;
        }
        self.skeleton.extend_from_slice(&chunk[..used]);
        if ended {
            let top_level = self.frames.len() == 1 && self.deeper == 0;
            let key = match (&name[..(*len).min(8)], *len, *plain) {
                (b"data", 4, true) if top_level => Key::Data,
                (b"b64_json", 8, true) => Key::B64Json,
                _ => Key::Other,
            };
            if key == Key::Data {
                // A repeated `data`: a JSON reader keeps the last one, so only its images count.
                self.images.clear();
            }
            if let Some(Frame::Object { key: current, .. }) = self.frames.last_mut() {
                *current = key;
            }
            self.lex = Lex::Between;
        }
        used
    }

    /// An image's base64: decoded, not kept; its closing quote is kept.
    fn image(&mut self, chunk: &[u8]) -> usize {
        let Lex::Image(image) = &mut self.lex else { return 0 };
        let mut i = 0;
        while i < chunk.len() {
            match image.escape {
                Escape::None => {
                    let rest = &chunk[i..];
                    let Some(at) = memchr::memchr2(b'"', b'\\', rest) else {
                        image.decoder.push(rest);
                        return chunk.len();
                    };
                    image.decoder.push(&rest[..at]);
                    i += at + 1;
                    if rest[at] == b'"' {
                        self.skeleton.push(b'"');
                        if let Lex::Image(image) = std::mem::replace(&mut self.lex, Lex::Between) {
                            self.end_image(*image);
                        }
                        return i;
                    }
                    image.escape = Escape::Backslash;
                }
                Escape::Backslash => {
                    match chunk[i] {
                        b'/' => {
                            image.decoder.push(b"/");
                            image.escape = Escape::None;
                        }
                        b'u' => image.escape = Escape::Unicode { digits: 0, value: 0 },
                        _ => {
                            // `\"`, `\\`, `\n`…: characters base64 does not have.
                            image.decoder.refuse();
                            image.escape = Escape::None;
                        }
                    }
                    i += 1;
                }
                Escape::Unicode { digits, value } => {
                    let digit = char::from(chunk[i]).to_digit(16);
                    i += 1;
                    let Some(digit) = digit else {
                        // Not an escape JSON has: the text is not base64 either way.
                        image.decoder.refuse();
                        image.escape = Escape::None;
                        continue;
                    };
                    let value = value * 16 + digit;
                    if digits < 3 {
                        image.escape = Escape::Unicode { digits: digits + 1, value };
                        continue;
                    }
                    match u8::try_from(value) {
                        Ok(ascii) if ascii.is_ascii() => image.decoder.push(&[ascii]),
                        _ => image.decoder.refuse(),
                    }
                    image.escape = Escape::None;
                }
            }
        }
        chunk.len()
    }

    fn end_image(&mut self, image: ImageText) {
        let ImageText { index, slot, decoder, escape } = image;
        let complete = matches!(escape, Escape::None);
        let image = match &mut self.spill {
            Some((count, ended)) => {
                *count += 1;
                match decoder.finish_spilled() {
                    Some((rest, sha256)) if complete => {
                        ended.extend(rest.into_iter().map(|block| (slot, block)));
                        Some(Image::Spilled { slot, sha256 })
                    }
                    _ => None,
                }
            }
            None if complete => decoder.finish().map(Image::Decoded),
            None => None,
        };
        self.set_image(index, image);
    }

    fn set_image(&mut self, index: usize, image: Option<Image>) {
        match self.images.iter_mut().find(|(i, _)| *i == index) {
            Some(slot) => slot.1 = image,
            None => self.images.push((index, image)),
        }
    }
}

/// Bytes of a JSON string up to and including its closing quote: how many of `chunk` belong to it, and whether
/// it ended. `escaped` carries an escape cut by the chunk's end.
fn text(chunk: &[u8], escaped: &mut bool) -> (usize, bool) {
    let mut i = 0;
    if *escaped {
        *escaped = false;
        i = 1;
    }
    while i < chunk.len() {
        let Some(at) = memchr::memchr2(b'"', b'\\', &chunk[i..]) else { return (chunk.len(), false) };
        i += at;
        if chunk[i] == b'"' {
            return (i + 1, true);
        }
        // A backslash: the next byte is escaped, in this chunk or the next.
        if i + 1 == chunk.len() {
            *escaped = true;
            return (chunk.len(), false);
        }
        i += 2;
    }
    (chunk.len().min(i), false)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail by panicking")]

    use base64::Engine as _;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::*;

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    fn image(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    fn read(body: &[u8], chunk: usize) -> Split {
        let mut splitter = Splitter::new(Some(body.len()));
        for piece in body.chunks(chunk.max(1)) {
            splitter.feed(piece);
        }
        splitter.finish()
    }

    fn decoded(bytes: &[u8]) -> Option<Image> {
        Some(Image::Decoded(Decoded {
            bytes: Bytes::copy_from_slice(bytes),
            sha256: sha2::Sha256::digest(bytes).into(),
        }))
    }

    #[test]
    fn a_gpt_answer_keeps_everything_but_the_base64_and_decodes_each_image_with_its_hash() {
        let (one, two) = (image(200_000, 1), image(5, 2));
        let answer = json!({
            "created": 1,
            "data": [{"b64_json": b64(&one), "revised_prompt": "a \"quoted\" \\ prompt"}, {"b64_json": b64(&two)}],
            "usage": {"total_tokens": 3, "input_tokens_details": {"text_tokens": 1}},
            "background": "opaque",
        });
        let body = serde_json::to_vec(&answer).unwrap();
        for chunk in [1, 2, 3, 7, 64, 4096, 65_536, body.len()] {
            let split = read(&body, chunk);
            let mut expected = answer.clone();
            expected["data"][0]["b64_json"] = json!("");
            expected["data"][1]["b64_json"] = json!("");
            assert_eq!(split.skeleton, serde_json::to_vec(&expected).unwrap(), "chunks of {chunk}");
            assert_eq!(split.images, vec![(0, decoded(&one)), (1, decoded(&two))], "chunks of {chunk}");
        }
    }

    /// Read spilling: the skeleton, the images, and the blocks handed out for each slot, joined.
    fn spill(body: &[u8], chunk: usize) -> (Split, Vec<(usize, Vec<u8>)>) {
        let mut splitter = Splitter::spilling(Some(body.len()));
        let mut slots: Vec<(usize, Vec<u8>)> = Vec::new();
        let mut take = |splitter: &mut Splitter| {
            for (slot, block) in splitter.take_spilled() {
                assert!(block.len() <= SPILL_CAPACITY, "a block of {} bytes", block.len());
                match slots.iter_mut().find(|(s, _)| *s == slot) {
                    Some((_, bytes)) => bytes.extend_from_slice(&block),
                    None => slots.push((slot, block.to_vec())),
                }
            }
        };
        for piece in body.chunks(chunk.max(1)) {
            splitter.feed(piece);
            take(&mut splitter);
        }
        (splitter.finish(), slots)
    }

    #[test]
    fn spilling_hands_each_image_out_in_blocks_under_its_own_slot_and_keeps_none() {
        let (one, two) = (image(1_000_000, 1), image(5, 2));
        let body = format!(
            r#"{{"data":[{{"b64_json":"{}","b64_json":"{}"}},{{"b64_json":"{}"}},{{"b64_json":"QU
JD"}}]}}"#,
            b64(b"replaced"),
            b64(&one),
            b64(&two)
        )
        .replace(
            "QU
JD", "QU\nJD",
        );
        for chunk in [1, 7, 4096, 65_536, body.len()] {
            let (split, slots) = spill(body.as_bytes(), chunk);
            assert_eq!(
                split.skeleton,
                &br#"{"data":[{"b64_json":"","b64_json":""},{"b64_json":""},{"b64_json":""}]}"#[..]
            );
            // A repeated `b64_json` begins a new slot; the last one counts. Bad text: no image.
            let spilled =
                |slot, bytes: &[u8]| Some(Image::Spilled { slot, sha256: sha2::Sha256::digest(bytes).into() });
            assert_eq!(split.images, vec![(0, spilled(1, &one)), (1, spilled(2, &two)), (2, None)]);
            let slot = |n: usize| slots.iter().find(|(s, _)| *s == n).map(|(_, b)| b.as_slice());
            assert_eq!(slot(0), Some(&b"replaced"[..]), "chunks of {chunk}");
            assert!(slot(1) == Some(&one[..]), "chunks of {chunk}: {:?} bytes", slot(1).map(<[u8]>::len));
            assert_eq!(slot(2), Some(&two[..]), "chunks of {chunk}");
        }
    }

    #[test]
    fn spilling_refuses_an_image_whose_text_was_cut_off_or_not_base64() {
        let text = b64(&image(300_000, 3));
        let cut = format!(r#"{{"data":[{{"b64_json":"{}"#, &text[..200_000]);
        assert_eq!(spill(cut.as_bytes(), 4096).0.images, vec![(0, None)]);
        let bad = format!(r#"{{"data":[{{"b64_json":"{}=A{}"}}]}}"#, &text[..100_000], &text[100_002..]);
        assert_eq!(spill(bad.as_bytes(), 4096).0.images, vec![(0, None)]);
    }

    #[test]
    fn base64_elsewhere_and_answers_of_other_shapes_pass_as_they_came() {
        for body in [
            json!({"data": [{"url": "https://x/y.png"}], "b64_json": "QUJD"}),
            json!({"error": {"message": "no", "b64_json": "QUJD"}}),
            json!({"meta": {"data": [{"b64_json": "QUJD"}]}}),
            json!({"data": [[{"b64_json": "QUJD"}]], "x": [{"data": [{"b64_json": "QUJD"}]}]}),
            json!({"data": {"b64_json": "QUJD"}}),
            json!([{"data": [{"b64_json": "QUJD"}]}]),
            json!({"data": [{"nested": {"b64_json": "QUJD"}}, {"b64_json": ["QUJD"]}]}),
        ] {
            let body = serde_json::to_vec(&body).unwrap();
            let split = read(&body, 3);
            assert_eq!(split.skeleton, body, "{}", String::from_utf8_lossy(&body));
            assert!(split.images.is_empty());
        }
        // Not JSON at all, or cut off: kept as it came.
        for body in [&b"<html>502 Bad Gateway</html>"[..], b"{\"data\":[{\"url\":\"ab", b"\"\\", b"}}]]{{[["] {
            assert_eq!(read(body, 1).skeleton, body);
        }
    }

    #[test]
    fn an_escaped_key_is_left_for_a_whole_reader_and_escapes_in_the_text_decode_as_json_reads_them() {
        let body = br#"{"data":[{"b64\u005fjson":"QUJD"}]}"#;
        let split = read(body, 5);
        assert_eq!(split.skeleton, &body[..]);
        assert!(split.images.is_empty());

        // `\/` and `\u00XX` are the characters they stand for; any other escape is not base64.
        let text = b64(&image(300, 9));
        let escaped = text.replace('/', "\\/").replacen('A', "\\u0041", 3);
        let body =
            format!(r#"{{"data":[{{"b64_json":"{escaped}"}},{{"b64_json":"QU\nJD"}},{{"b64_json":"QU\u00e9JD"}}]}}"#);
        let body = body.replace("QU\nJD", "QU\\nJD").replace("QU\u{e9}JD", "QU\\u00e9JD");
        for chunk in [1, 2, 5, 1000] {
            let split = read(body.as_bytes(), chunk);
            assert_eq!(split.skeleton, &br#"{"data":[{"b64_json":""},{"b64_json":""},{"b64_json":""}]}"#[..]);
            assert_eq!(split.images, vec![(0, decoded(&image(300, 9))), (1, None), (2, None)], "chunks of {chunk}");
        }
    }

    #[test]
    fn a_repeated_data_or_b64_json_keeps_the_last_as_a_json_reader_does() {
        let body = format!(
            r#"{{"data":[{{"b64_json":"{}"}}],"data":[{{"b64_json":"{}","b64_json":"{}"}}]}}"#,
            b64(b"first"),
            b64(b"second"),
            b64(b"third")
        );
        let split = read(body.as_bytes(), 4);
        assert_eq!(split.images, vec![(0, decoded(b"third"))]);
        let parsed: Value = serde_json::from_slice(&split.skeleton).unwrap();
        assert_eq!(parsed["data"][0]["b64_json"], "");
    }

    #[test]
    fn text_that_is_not_base64_is_refused_as_a_whole_decode_refuses_it() {
        let reference = base64::engine::general_purpose::STANDARD;
        // Padding where a block ends, in the middle of the text: valid block by block, refused whole.
        let mut text = reference.encode(vec![7u8; 48 * 1024 - 1]);
        assert!(text.ends_with('='));
        text.push_str(&reference.encode(b"more"));
        let mut bad = vec![text];
        bad.extend(["abc", "ab=c", "Zm9v YmFy", "Zm9vYg", "Zm9v*mFy", "===="].map(String::from));
        for text in bad {
            assert!(BASE64.decode_to_vec(text.as_bytes()).is_err());
            let body = format!(r#"{{"data":[{{"b64_json":"{text}"}}]}}"#);
            for chunk in [1, 3, 4096, body.len()] {
                assert_eq!(read(body.as_bytes(), chunk).images, vec![(0, None)], "{text:.20} in chunks of {chunk}");
            }
        }
        // Cut off inside the text.
        // Cut off inside the text: the image's place is still known (and the skeleton, not JSON, is refused by
        // whoever reads it).
        assert_eq!(read(br#"{"data":[{"b64_json":"QUJ"#, 2).images, vec![(0, None)]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever the images and however the answer is cut into chunks, the images are exactly the
        /// base64's decode and the skeleton is the answer with their text left out.
        #[test]
        fn any_chunking_gives_the_same_images_and_skeleton(
            lens in proptest::collection::vec(0usize..150_000, 0..4),
            chunk in 1usize..70_000,
            prompt in "[ -~]{0,40}",
        ) {
            let images: Vec<Vec<u8>> = lens.iter().enumerate().map(|(i, &len)| image(len, i as u8)).collect();
            let items: Vec<Value> =
                images.iter().map(|bytes| json!({"revised_prompt": prompt, "b64_json": b64(bytes)})).collect();
            let body = serde_json::to_vec(&json!({"created": 7, "data": items, "usage": {"n": [1, {"b64_json": "x"}]}})).unwrap();
            let split = read(&body, chunk);
            let expected: Vec<(usize, Option<Image>)> =
                images.iter().enumerate().map(|(i, bytes)| (i, decoded(bytes))).collect();
            prop_assert_eq!(&split.images, &expected);
            let mut skeleton: Value = serde_json::from_slice(&split.skeleton).unwrap();
            for (i, bytes) in images.iter().enumerate() {
                prop_assert_eq!(&skeleton["data"][i]["b64_json"], &json!(""));
                skeleton["data"][i]["b64_json"] = json!(b64(bytes));
            }
            prop_assert_eq!(serde_json::to_vec(&skeleton).unwrap(), body);
        }
    }
}

//! A multipart part's data as the chunks the parser yielded it in: a 4 MB file is never joined into one
//! buffer (a second copy beside the first while it is built); it is read through the list (validation, the
//! cache key, the replay fingerprint) and written upstream chunk by chunk.

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

/// A part's bytes, in order, as one or more non-empty chunks (none when empty). Text fields are one chunk
/// (the parser joins a text field that came in several, text being small and read as `&str`).
#[derive(Clone, Default)]
pub struct Data {
    chunks: Vec<Bytes>,
    len: usize,
}

impl Data {
    /// The data made of these chunks, in order, as they are (no copy; empty chunks are dropped).
    pub fn from_chunks(chunks: Vec<Bytes>) -> Self {
        let mut chunks = chunks;
        chunks.retain(|c| !c.is_empty());
        let len = chunks.iter().map(Bytes::len).sum();
        Self { chunks, len }
    }

    /// The chunks, in order (each non-empty).
    pub fn chunks(&self) -> &[Bytes] {
        &self.chunks
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes as one slice, when they are held in at most one chunk (always so for text fields).
    pub fn contiguous(&self) -> Option<&[u8]> {
        match self.chunks.as_slice() {
            [] => Some(&[]),
            [one] => Some(one),
            _ => None,
        }
    }

    /// The data as UTF-8 text, when it is one chunk of valid UTF-8 (text fields are one chunk).
    pub fn text(&self) -> Option<&str> {
        self.contiguous().and_then(|b| std::str::from_utf8(b).ok())
    }

    /// The bytes in one buffer: the chunk itself when there is one, else a copy. For tests and tools; requests
    /// are read through [`Data::chunks`].
    pub fn to_bytes(&self) -> Bytes {
        match self.chunks.as_slice() {
            [] => Bytes::new(),
            [one] => one.clone(),
            chunks => {
                let mut out = Vec::with_capacity(self.len);
                for chunk in chunks {
                    out.extend_from_slice(chunk);
                }
                Bytes::from(out)
            }
        }
    }

    /// The SHA-256 of the bytes, read chunk by chunk.
    pub fn sha256(&self) -> [u8; 32] {
        let mut hasher = Sha256::new();
        for chunk in &self.chunks {
            hasher.update(chunk);
        }
        hasher.finalize().into()
    }

    /// The last `n` bytes (or all, if fewer): a slice of the last chunk when it holds them, else a copy of
    /// at most `n` bytes.
    pub fn tail(&self, n: usize) -> std::borrow::Cow<'_, [u8]> {
        let n = n.min(self.len);
        match self.chunks.last() {
            None => std::borrow::Cow::Borrowed(&[]),
            Some(last) if last.len() >= n => std::borrow::Cow::Borrowed(&last[last.len() - n..]),
            Some(_) => {
                let mut out = Vec::with_capacity(n);
                let mut skip = self.len - n;
                for chunk in &self.chunks {
                    if skip >= chunk.len() {
                        skip -= chunk.len();
                        continue;
                    }
                    out.extend_from_slice(&chunk[skip..]);
                    skip = 0;
                }
                std::borrow::Cow::Owned(out)
            }
        }
    }

    /// Whether these bytes are `other`'s, wherever either's chunks are cut.
    fn same_bytes<'a>(&self, other: impl IntoIterator<Item = &'a [u8]> + Clone) -> bool {
        let total: usize = other.clone().into_iter().map(<[u8]>::len).sum();
        total == self.len
            && self.chunks.iter().flat_map(|c| c.iter()).zip(other.into_iter().flatten()).all(|(x, y)| x == y)
    }
}

impl std::fmt::Debug for Data {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.contiguous() {
            Some(one) => std::fmt::Debug::fmt(&Bytes::copy_from_slice(&one[..one.len().min(64)]), f),
            None => write!(f, "Data({} bytes in {} chunks)", self.len, self.chunks.len()),
        }
    }
}

impl From<Bytes> for Data {
    fn from(bytes: Bytes) -> Self {
        Self::from_chunks(vec![bytes])
    }
}

impl From<Vec<u8>> for Data {
    fn from(bytes: Vec<u8>) -> Self {
        Bytes::from(bytes).into()
    }
}

impl From<String> for Data {
    fn from(text: String) -> Self {
        Bytes::from(text).into()
    }
}

impl From<&'static str> for Data {
    fn from(text: &'static str) -> Self {
        Bytes::from_static(text.as_bytes()).into()
    }
}

impl From<&'static [u8]> for Data {
    fn from(bytes: &'static [u8]) -> Self {
        Bytes::from_static(bytes).into()
    }
}

impl PartialEq for Data {
    fn eq(&self, other: &Self) -> bool {
        self.same_bytes(other.chunks.iter().map(|c| &c[..]))
    }
}

impl Eq for Data {}

impl PartialEq<Bytes> for Data {
    fn eq(&self, other: &Bytes) -> bool {
        self.same_bytes([&other[..]])
    }
}

impl PartialEq<[u8]> for Data {
    fn eq(&self, other: &[u8]) -> bool {
        self.same_bytes([other])
    }
}

impl PartialEq<&[u8]> for Data {
    fn eq(&self, other: &&[u8]) -> bool {
        self == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_read_as_the_bytes_they_hold() {
        let data = Data::from_chunks(vec![
            Bytes::from_static(b"ab"),
            Bytes::new(),
            Bytes::from_static(b"cde"),
            Bytes::from_static(b"f"),
        ]);
        assert_eq!(data.chunks().len(), 3, "empty chunks are dropped");
        assert_eq!(data.len(), 6);
        assert_eq!(data.contiguous(), None);
        assert_eq!(data.to_bytes(), Bytes::from_static(b"abcdef"));
        assert_eq!(data, Data::from(&b"abcdef"[..]));
        assert_ne!(data, Data::from(&b"abcdeg"[..]));
        assert_ne!(data, Data::from(&b"abcde"[..]));
        assert_eq!(data.sha256(), <[u8; 32]>::from(Sha256::digest(b"abcdef")));
        assert_eq!(&data.tail(4)[..], b"cdef");
        assert_eq!(&data.tail(1)[..], b"f");
        assert_eq!(&data.tail(100)[..], b"abcdef");
        assert_eq!(Data::default().tail(4).len(), 0);
        assert_eq!(Data::from("text").text(), Some("text"));
        assert_eq!(data.text(), None, "text fields are one chunk");
    }
}

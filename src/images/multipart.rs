//! Parsing `multipart/form-data` bodies into a [`Form`], keeping every part and its order.
//!
//! The body is already in memory (bounded by `server.max_multipart_body`), as the chunks it was received in.
//! The parser takes one chunk at a time and each chunk is freed once parsed, so the body is held about once
//! while it is parsed; each part's data is kept as the chunks the parser yields (slices of its copy of the
//! body, never joined). The form goes upstream written afresh (`Form::outgoing`) with those chunks as they
//! are, so what the upstream parses is what was validated, and the upload is copied once (by the parser).

use bytes::Bytes;

use super::request::{Data, Form, Part};
use crate::error::ApiError;

/// Fields imagegate reads as text: a file part under one of these names is refused (a parser that took the
/// file for the field, or the field for the file, would act on something else than what was validated).
pub const TEXT_FIELDS: &[&str] = &[
    "model",
    "prompt",
    "n",
    "size",
    "quality",
    "style",
    "response_format",
    "background",
    "moderation",
    "output_format",
    "output_compression",
    "input_fidelity",
    "user",
    "stream",
    "partial_images",
];

/// Parse a request body as it arrives (see [`parse_stream`]) into the form that goes upstream (repeated
/// identical fields collapsed, see [`collapse_repeats`]). The form is always written afresh under a boundary
/// of imagegate's own (`Form::outgoing`), so the upstream parses exactly what was validated, whatever the
/// caller's encoding did.
pub async fn parse_arriving<S, E>(content_type: &str, chunks: S) -> Result<Form, ApiError>
where
    S: futures::Stream<Item = Result<Bytes, E>> + Send + Unpin,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut form = parse_stream(content_type, chunks).await?;
    collapse_repeats(&mut form);
    Ok(form)
}

/// Parse `raw` with the boundary from `content_type` (see [`parse_chunks`]).
pub async fn parse(content_type: &str, raw: Bytes) -> Result<Form, ApiError> {
    parse_chunks(content_type, vec![raw]).await
}

/// Parse a body received as `chunks` with the boundary from `content_type` (see [`parse_stream`]).
pub async fn parse_chunks(content_type: &str, chunks: Vec<Bytes>) -> Result<Form, ApiError> {
    let chunks = futures::stream::iter(chunks.into_iter().map(Ok::<Bytes, std::convert::Infallible>));
    parse_stream(content_type, chunks).await
}

/// Parse a body as its chunks come from `chunks` (a connection's body as it arrives, or chunks already
/// received) with the boundary from `content_type`. A content type naming its boundary twice is refused
/// (parsers disagree on which one counts). Repeated identical scalar fields are kept (see
/// [`collapse_repeats`]); repeated differing ones are refused. An error from `chunks` ends the parse as a
/// malformed body (the caller, whose stream made the error, knows better what it was).
///
/// The parser copies what it is given into a buffer of its own, so it is given one chunk at a time, each
/// parsed before the next is taken in: a chunk is freed once parsed (a connection's read buffer is then
/// reused for the next), and the body is never held twice.
pub async fn parse_stream<S, E>(content_type: &str, chunks: S) -> Result<Form, ApiError>
where
    S: futures::Stream<Item = Result<Bytes, E>> + Send + Unpin,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let boundaries = content_type
        .split(';')
        .skip(1)
        .filter(|param| param.split_once('=').is_some_and(|(k, _)| k.trim().eq_ignore_ascii_case("boundary")))
        .count();
    if boundaries > 1 {
        return Err(ApiError::invalid(
            "Invalid multipart/form-data request: the Content-Type header names more than one boundary.",
            None,
        ));
    }
    let boundary = multer::parse_boundary(content_type).map_err(|_| {
        ApiError::invalid("Invalid multipart/form-data request: the Content-Type header has no boundary.", None)
    })?;
    // One chunk per poll: after each item (the end included) the stream is pending once, so the parser
    // parses what it has before it takes in (and copies) the next chunk. (The end must not come in the same
    // poll as the last chunk either: multer then reports a stream whose first boundary it has not looked
    // for yet as incomplete.)
    let (mut chunks, mut pause) = (chunks, false);
    let stream = futures::stream::poll_fn(move |cx| {
        if pause {
            pause = false;
            cx.waker().wake_by_ref();
            return std::task::Poll::Pending;
        }
        let item = std::task::ready!(futures::StreamExt::poll_next_unpin(&mut chunks, cx));
        pause = true;
        std::task::Poll::Ready(item)
    });
    let mut multipart = multer::Multipart::new(stream, boundary);
    let mut form = Form::default();
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(e) => return Err(malformed(&e)),
        };
        let Some(name) = field.name().map(str::to_owned) else {
            return Err(ApiError::invalid("Invalid multipart/form-data request: a part has no field name.", None));
        };
        // A name holding `;` or `=` reads as more parameters to some parsers (a part named `x; filename=` is a
        // file to multer once written back); no OpenAI field is named so, and what goes upstream must be the
        // form validated here.
        if name.contains([';', '=']) {
            return Err(ApiError::invalid(
                "Invalid multipart/form-data request: a part's name contains ';' or '='.",
                None,
            ));
        }
        let file_name = field.file_name().map(str::to_owned);
        if file_name.is_some() && TEXT_FIELDS.contains(&name.as_str()) {
            return Err(ApiError::invalid(
                format!("Invalid value for '{name}': it is a text field, and was sent as a file."),
                Some(name),
            ));
        }
        let content_type = field.content_type().map(|m| m.essence_str().to_owned());
        let data = field_data(field, file_name.is_some()).await.map_err(|e| malformed(&e))?;
        if file_name.is_none() && data.text().is_none() {
            return Err(ApiError::invalid(
                format!("Invalid value for '{name}': text fields must be UTF-8."),
                Some(name),
            ));
        }
        form.parts.push(Part { name, file_name, content_type, data });
    }
    check_duplicate_scalars(&form)?;
    Ok(form)
}

/// A part's data: a file's as the chunks the parser yields (slices of the parser's copy of the body, not
/// joined: a join would hold a second copy of the file beside the first while it is built); a text field's
/// in one buffer (text is small and read as `&str`), joined once when it came in several chunks.
async fn field_data(mut field: multer::Field<'_>, file: bool) -> Result<Data, multer::Error> {
    let mut chunks = Vec::new();
    while let Some(chunk) = field.chunk().await? {
        chunks.push(chunk);
    }
    if file || chunks.len() <= 1 {
        return Ok(Data::from_chunks(chunks));
    }
    let mut data = Vec::with_capacity(chunks.iter().map(Bytes::len).sum());
    for chunk in chunks.drain(..) {
        data.extend_from_slice(&chunk);
    }
    Ok(Data::from(data))
}

fn malformed(e: &multer::Error) -> ApiError {
    ApiError::invalid(format!("Invalid multipart/form-data request: {e}."), None)
}

/// A scalar field given twice with different values is ambiguous (which one would the upstream use?), so it
/// is refused. The same value twice (the Rust `async-openai` crate repeats `output_compression`) means one
/// thing and is allowed; [`collapse_repeats`] keeps one copy. Repeated file parts (`image[]`) and array-style
/// names (`foo[]`) are fine.
fn check_duplicate_scalars(form: &Form) -> Result<(), ApiError> {
    let mut seen = std::collections::HashMap::new();
    for p in form.parts.iter().filter(|p| is_scalar(p)) {
        match seen.insert(p.name.as_str(), &p.data) {
            Some(earlier) if *earlier != p.data => {
                return Err(ApiError::invalid(
                    format!("Duplicate parameter '{}': it was sent twice with different values.", p.name),
                    Some(p.name.clone()),
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

fn is_scalar(p: &Part) -> bool {
    !p.is_file() && !p.name.ends_with("[]")
}

/// Drop the later copies of scalar fields repeated with the same value; `true` when any was dropped.
pub fn collapse_repeats(form: &mut Form) -> bool {
    let before = form.parts.len();
    let mut seen = std::collections::HashSet::new();
    form.parts.retain(|p| !is_scalar(p) || seen.insert(p.name.clone()));
    form.parts.len() != before
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`parse_arriving`] of a body already received as `chunks`.
    async fn parse_body(content_type: &str, chunks: Vec<Bytes>) -> Result<Form, ApiError> {
        parse_arriving(
            content_type,
            futures::stream::iter(chunks.into_iter().map(Ok::<Bytes, std::convert::Infallible>)),
        )
        .await
    }

    fn body(parts: &[(&str, Option<&str>, &[u8])]) -> (String, Bytes) {
        let b = "XBOUNDARYX";
        let mut out = Vec::new();
        for (name, file, data) in parts {
            out.extend_from_slice(format!("--{b}\r\n").as_bytes());
            match file {
                Some(f) => out.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: image/png\r\n\r\n").as_bytes(),
                ),
                None => out.extend_from_slice(format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes()),
            }
            out.extend_from_slice(data);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(format!("--{b}--\r\n").as_bytes());
        (format!("multipart/form-data; boundary={b}"), Bytes::from(out))
    }

    /// Found by `cargo fuzz` (corpus `regression-name-with-filename-param`): a text part named
    /// `x; filename=` came back from its own re-encoding as a file part, so the form forwarded was not the
    /// form validated. Such names are refused; file names may hold `;` and `=`.
    #[tokio::test]
    async fn a_part_name_that_reads_as_parameters_is_refused() {
        for name in ["note; filename=", "note filename=x", "a=b", "a;b"] {
            let (ct, raw) = body(&[("prompt", None, b"x"), (name, None, b"text")]);
            let err = parse(&ct, raw).await.expect_err(name);
            assert_eq!(err.status().as_u16(), 400, "{name}");
            assert!(err.client_message().contains("name contains"), "{name}: {}", err.client_message());
        }
        let (ct, raw) = body(&[("image", Some("a; b=c.png"), b"\x89PNG")]);
        let form = parse(&ct, raw).await.unwrap();
        assert_eq!(form.parts[0].file_name.as_deref(), Some("a; b=c.png"));
    }

    #[tokio::test]
    async fn parts_keep_their_order_and_unknown_fields() {
        let (ct, raw) = body(&[
            ("image[]", Some("b.png"), b"second?no-first"),
            ("prompt", None, b"hello"),
            ("image[]", Some("a.png"), b"then-this"),
            ("brand_new_param", None, b"42"),
        ]);
        let form = parse(&ct, raw).await.unwrap();
        let names: Vec<_> = form.images().map(|p| p.file_name.clone().unwrap()).collect();
        assert_eq!(names, ["b.png", "a.png"]);
        assert_eq!(form.text("brand_new_param"), Some("42"));
        assert_eq!(form.images().next().unwrap().content_type.as_deref(), Some("image/png"));
    }

    #[tokio::test]
    async fn a_field_repeated_with_the_same_value_collapses_to_one_copy() {
        let (ct, raw) = body(&[
            ("output_compression", None, b"80"),
            ("image", Some("a.png"), b"bytes"),
            ("output_compression", None, b"80"),
            ("prompt", None, b"x"),
        ]);
        let form = parse_body(&ct, vec![raw]).await.unwrap();
        let names: Vec<&str> = form.parts.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["output_compression", "image", "prompt"]);
        let (raw, ct) = form.encode();
        let again = parse(&ct, raw).await.unwrap();
        assert_eq!(again.parts.len(), 3, "the forwarded body carries one copy");
        // Nothing repeated: the form still goes out re-encoded under imagegate's boundary, part for part.
        let (ct, raw) = body(&[("prompt", None, b"x")]);
        let (forwarded, forwarded_ct) = parse_body(&ct, vec![raw]).await.unwrap().encode();
        assert!(forwarded_ct.contains("boundary=imagegate-"), "{forwarded_ct}");
        assert_eq!(parse(&forwarded_ct, forwarded).await.unwrap().text("prompt"), Some("x"));
    }

    #[tokio::test]
    async fn duplicate_scalars_and_garbage_are_refused() {
        let (ct, raw) = body(&[("prompt", None, b"a"), ("prompt", None, b"b")]);
        let err = parse(&ct, raw).await.unwrap_err();
        assert_eq!(err.param(), Some("prompt"));

        let err =
            parse("multipart/form-data; boundary=XB", Bytes::from_static(b"not multipart at all")).await.unwrap_err();
        assert_eq!(err.status().as_u16(), 400);
        let err = parse("multipart/form-data", Bytes::new()).await.unwrap_err();
        assert!(err.client_message().contains("boundary"));
    }

    #[tokio::test]
    async fn two_boundaries_and_a_file_named_like_a_text_field_are_refused() {
        let (ct, raw) = body(&[("prompt", None, b"a")]);
        let err = parse(&format!("{ct}; boundary=other"), raw.clone()).await.unwrap_err();
        assert!(err.client_message().contains("more than one boundary"), "{}", err.client_message());
        let err = parse(&format!("{ct}; BOUNDARY=\"other\""), raw).await.unwrap_err();
        assert!(err.client_message().contains("more than one boundary"));

        let (ct, raw) = body(&[("prompt", None, b"a"), ("model", Some("m.txt"), b"gpt-image-1")]);
        let err = parse(&ct, raw).await.unwrap_err();
        assert_eq!(err.param(), Some("model"));
    }

    #[tokio::test]
    async fn a_reencoded_form_parses_back_to_the_same_parts_under_a_fresh_boundary() {
        let (ct, raw) = body(&[("image[]", Some("a.png"), b"\x89PNG--XBOUNDARYX"), ("prompt", None, b"hello")]);
        let form = parse(&ct, raw).await.unwrap();
        let (body, content_type) = form.encode();
        assert!(content_type.starts_with("multipart/form-data; boundary=imagegate-"), "{content_type}");
        let again = parse(&content_type, body).await.unwrap();
        assert_eq!(again.parts.len(), 2);
        assert_eq!(again.parts[0].data, &b"\x89PNG--XBOUNDARYX"[..]);
        assert_eq!(form.parts[0].data, &b"\x89PNG--XBOUNDARYX"[..]);
        assert_eq!(again.text("prompt"), Some("hello"));
    }

    #[tokio::test]
    async fn a_body_in_many_chunks_parses_as_in_one_whatever_the_cuts() {
        let image: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (ct, raw) =
            body(&[("image[]", Some("a.png"), &image), ("prompt", None, b"hello\r\n--XBOUNDARY"), ("n", None, b"2")]);
        let whole = parse(&ct, raw.clone()).await.unwrap();
        for size in [1, 7, 13, 64, 1000, 4096] {
            let chunks: Vec<Bytes> = raw.chunks(size).map(Bytes::copy_from_slice).collect();
            let form = parse_chunks(&ct, chunks).await.unwrap();
            let summary = |f: &Form| f.parts.iter().map(|p| (p.name.clone(), p.data.clone())).collect::<Vec<_>>();
            assert_eq!(summary(&form), summary(&whole), "cut every {size} bytes");
        }
        assert_eq!(whole.parts[0].data, &image[..]);
    }

    /// A file that arrives in many chunks is kept as the parser's chunks (no joined copy), and what goes
    /// upstream is byte for byte what the same form with the file in one buffer sends.
    #[tokio::test]
    async fn a_file_in_many_chunks_is_not_joined_and_goes_upstream_unchanged() {
        let image: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let (ct, raw) = body(&[("prompt", None, b"hello"), ("image[]", Some("a.png"), &image), ("n", None, b"2")]);
        let chunks: Vec<Bytes> = raw.chunks(16 * 1024).map(Bytes::copy_from_slice).collect();
        let form = parse_body(&ct, chunks).await.unwrap();
        let file = &form.parts[1].data;
        assert!(file.chunks().len() >= 10, "kept as the parser yielded it: {} chunks", file.chunks().len());
        assert_eq!(*file, &image[..]);
        assert_eq!(form.text("prompt"), Some("hello"));

        // The same form with the file joined into one buffer: the upstream gets the same bytes.
        let mut joined = form.clone();
        joined.parts[1].data = Data::from(image.clone());
        assert_eq!(joined.parts[1].data.chunks().len(), 1);
        let (split, split_ct) = form.encode();
        let (one, one_ct) = joined.encode();
        let boundary = |ct: &str| ct.split_once("boundary=").map(|(_, b)| b.to_owned()).unwrap();
        assert_eq!(split.len(), one.len());
        // Each body has its own random boundary (of one length): put the split one's into the joined one's.
        let mut expected = one.to_vec();
        let (old, new) = (boundary(&one_ct), boundary(&split_ct));
        let mut at = 0;
        while let Some(i) = memchr::memmem::find(&expected[at..], old.as_bytes()) {
            expected[at + i..at + i + old.len()].copy_from_slice(new.as_bytes());
            at += i + old.len();
        }
        assert_eq!(&split[..], &expected[..]);
        // And the upstream's body holds the parser's chunks themselves, not copies of them.
        let outgoing = form.outgoing(None);
        for chunk in file.chunks() {
            assert!(outgoing.chunks.iter().any(|c| c.as_ptr() == chunk.as_ptr() && c.len() == chunk.len()));
        }
    }
}

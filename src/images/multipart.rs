//! Parsing `multipart/form-data` bodies into a [`Form`], keeping every part and its order.
//!
//! The body is already in memory (bounded by `server.max_multipart_body`); parsing only slices it, so file
//! parts share the request's buffer and are forwarded without copies.

use bytes::Bytes;

use super::request::{Form, Part};
use crate::error::ApiError;

/// Parse a request body: the body to forward, its content type and the form. A body whose repeated
/// identical fields were collapsed is re-encoded (every other part byte for byte); otherwise the caller's
/// bytes go upstream unchanged.
pub async fn parse_body(content_type: String, raw: Bytes) -> Result<(Bytes, String, Form), ApiError> {
    let mut form = parse(&content_type, raw.clone()).await?;
    if collapse_repeats(&mut form) {
        let (raw, content_type) = form.encode();
        return Ok((raw, content_type, form));
    }
    Ok((raw, content_type, form))
}

/// Parse `raw` with the boundary from `content_type`. Repeated identical scalar fields are kept (see
/// [`collapse_repeats`]); repeated differing ones are refused.
pub async fn parse(content_type: &str, raw: Bytes) -> Result<Form, ApiError> {
    let boundary = multer::parse_boundary(content_type).map_err(|_| {
        ApiError::invalid("Invalid multipart/form-data request: the Content-Type header has no boundary.", None)
    })?;
    let stream = futures::stream::once(async move { Ok::<Bytes, std::convert::Infallible>(raw) });
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
        let file_name = field.file_name().map(str::to_owned);
        let content_type = field.content_type().map(|m| m.essence_str().to_owned());
        let data = field.bytes().await.map_err(|e| malformed(&e))?;
        if file_name.is_none() && std::str::from_utf8(&data).is_err() {
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
        let (raw, ct, form) = parse_body(ct, raw).await.unwrap();
        let names: Vec<&str> = form.parts.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["output_compression", "image", "prompt"]);
        let again = parse(&ct, raw).await.unwrap();
        assert_eq!(again.parts.len(), 3, "the forwarded body carries one copy");
        // Nothing repeated: the caller's bytes are forwarded as they came.
        let (ct, raw) = body(&[("prompt", None, b"x")]);
        let (forwarded, _, _) = parse_body(ct, raw.clone()).await.unwrap();
        assert_eq!(forwarded, raw);
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
}

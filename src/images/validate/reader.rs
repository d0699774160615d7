//! Typed reads of request fields, the same for JSON bodies and multipart text fields, and the error
//! constructors that spell OpenAI's validation messages. `null` reads as absent.

use serde_json::Value;

use crate::error::ApiError;
use crate::images::request::{Form, ImageRequest, RequestBody, parse_integer};

/// Reads fields of one request with their expected types.
pub struct Reader<'a> {
    body: &'a RequestBody,
}

impl<'a> Reader<'a> {
    pub fn new(request: &'a ImageRequest) -> Self {
        Self { body: &request.body }
    }

    /// The JSON value of a JSON field, or `None` for multipart / absent / null.
    pub fn json(&self, name: &str) -> Option<&'a Value> {
        match self.body {
            RequestBody::Json { fields, .. } => fields.get(name).filter(|v| !v.is_null()),
            RequestBody::Multipart { .. } => None,
        }
    }

    pub fn form(&self) -> Option<&'a Form> {
        match self.body {
            RequestBody::Multipart { form, .. } => Some(form),
            RequestBody::Json { .. } => None,
        }
    }

    /// Whether the field was given a non-null value.
    pub fn present(&self, name: &str) -> bool {
        match self.body {
            RequestBody::Json { fields, .. } => fields.get(name).is_some_and(|v| !v.is_null()),
            RequestBody::Multipart { form, .. } => form.parts.iter().any(|p| p.name == name),
        }
    }

    /// A string field.
    pub fn string(&self, name: &str) -> Result<Option<&'a str>, ApiError> {
        match self.body {
            RequestBody::Json { fields, .. } => match fields.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.as_str())),
                Some(other) => Err(invalid_type(name, "a string", other)),
            },
            RequestBody::Multipart { form, .. } => match form.parts.iter().find(|p| p.name == name) {
                None => Ok(None),
                Some(p) if p.is_file() => Err(file_instead_of_text(name)),
                Some(p) => Ok(p.data.text()),
            },
        }
    }

    /// An integer field (multipart text must be a plain decimal integer).
    pub fn integer(&self, name: &str) -> Result<Option<i64>, ApiError> {
        match self.body {
            RequestBody::Json { fields, .. } => match fields.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Number(n)) => match n.as_i64() {
                    Some(i) => Ok(Some(i)),
                    // Integers beyond i64 are out of any range we check; report them as such.
                    None if n.as_u64().is_some() => Ok(Some(i64::MAX)),
                    None => Err(invalid_type(name, "an integer", &Value::Number(n.clone()))),
                },
                Some(other) => Err(invalid_type(name, "an integer", other)),
            },
            // The one reading of integers in text (`request::parse_integer`): plain decimal digits, no `+`,
            // no leading zeros, no whitespace, so what is checked is what the upstream will read.
            RequestBody::Multipart { .. } => match self.string(name)? {
                None => Ok(None),
                Some(text) => parse_integer(text).map(Some).ok_or_else(|| {
                    ApiError::invalid_code(
                        format!(
                            "Invalid type for '{name}': expected an integer written in plain decimal digits (such as \
                             '2'; no '+', spaces or leading zeros), but got '{}' instead.",
                            clip(text)
                        ),
                        Some(name),
                        "invalid_type",
                    )
                }),
            },
        }
    }

    /// A boolean field (multipart text `true` / `false`, as the SDKs send it).
    pub fn boolean(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.body {
            RequestBody::Json { fields, .. } => match fields.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Bool(b)) => Ok(Some(*b)),
                Some(other) => Err(invalid_type(name, "a boolean", other)),
            },
            RequestBody::Multipart { .. } => match self.string(name)? {
                None => Ok(None),
                Some("true") => Ok(Some(true)),
                Some("false") => Ok(Some(false)),
                Some(text) => Err(invalid_type(name, "a boolean", &Value::String(text.to_owned()))),
            },
        }
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a decimal",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `Invalid type for 'n': expected an integer, but got a string instead.`
pub fn invalid_type(param: &str, expected: &str, got: &Value) -> ApiError {
    ApiError::invalid_code(
        format!("Invalid type for '{param}': expected {expected}, but got {} instead.", kind_of(got)),
        Some(param),
        "invalid_type",
    )
}

fn file_instead_of_text(param: &str) -> ApiError {
    ApiError::invalid_code(
        format!("Invalid type for '{param}': expected a text field, but got a file instead."),
        Some(param),
        "invalid_type",
    )
}

/// `Invalid value: 'x'. Supported values are: 'a', 'b', and 'c'.`
pub fn invalid_value(param: &str, got: &str, allowed: &[&str]) -> ApiError {
    ApiError::invalid_code(
        format!("Invalid value: '{}'. Supported values are: {}.", clip(got), list(allowed)),
        Some(param),
        "invalid_value",
    )
}

/// A value refused for a reason other than not being in a list.
pub fn invalid_value_because(param: &str, got: &str, reason: &str) -> ApiError {
    ApiError::invalid_code(
        format!("Invalid value for '{param}': '{}': {reason}.", clip(got)),
        Some(param),
        "invalid_value",
    )
}

/// `Unsupported parameter: 'style' is not supported with model 'gpt-image-1'.`
pub fn unsupported(param: &str, model: &str) -> ApiError {
    ApiError::invalid_code(
        format!("Unsupported parameter: '{param}' is not supported with model '{model}'."),
        Some(param),
        "unsupported_parameter",
    )
}

/// `Missing required parameter: 'prompt'.`
pub fn missing(param: &str) -> ApiError {
    ApiError::invalid_code(format!("Missing required parameter: '{param}'."), Some(param), "missing_required_parameter")
}

/// Integer range errors, in OpenAI's wording.
pub fn out_of_range(param: &str, got: i64, min: i64, max: i64) -> Option<ApiError> {
    if got < min {
        return Some(ApiError::invalid_code(
            format!(
                "Invalid '{param}': integer below minimum value. Expected a value >= {min}, but got {got} instead."
            ),
            Some(param),
            "integer_below_min_value",
        ));
    }
    (got > max).then(|| {
        ApiError::invalid_code(
            format!(
                "Invalid '{param}': integer above maximum value. Expected a value <= {max}, but got {got} instead."
            ),
            Some(param),
            "integer_above_max_value",
        )
    })
}

/// `'a', 'b', and 'c'`
pub fn list(values: &[&str]) -> String {
    let quoted: Vec<String> = values.iter().map(|v| format!("'{v}'")).collect();
    match quoted.as_slice() {
        [] => String::new(),
        [one] => one.clone(),
        [a, b] => format!("{a} and {b}"),
        [rest @ .., last] => format!("{}, and {last}", rest.join(", ")),
    }
}

/// Echo at most 64 characters of a caller's value in a message.
fn clip(value: &str) -> String {
    let mut out: String = value.chars().take(64).collect();
    if value.chars().nth(64).is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_read_like_openai_messages() {
        assert_eq!(list(&["a"]), "'a'");
        assert_eq!(list(&["a", "b"]), "'a' and 'b'");
        assert_eq!(list(&["a", "b", "c"]), "'a', 'b', and 'c'");
    }

    #[test]
    fn long_values_are_clipped_in_messages() {
        let e = invalid_value("size", &"x".repeat(500), &["auto"]);
        assert!(e.client_message().len() < 200);
    }
}

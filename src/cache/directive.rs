//! How a caller steers one request through the cache (`Cache-Control`), and what `x-imagegate-cache` says
//! became of it.

/// How a caller asked this request to use the cache (`Cache-Control` request header).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Directive {
    #[default]
    Normal,
    /// `no-cache` (or `max-age=0`): do not answer from the cache; fetch anew and store the answer.
    Revalidate,
    /// `no-store`: neither read nor write the cache.
    Bypass,
}

impl Directive {
    /// From every `Cache-Control` header value of a request, each a comma-separated list of directives, read
    /// case-insensitively; `no-store` wins over `no-cache`, and `max-age=0` means `no-cache`. Other
    /// directives (`max-age=N` with N > 0, `private`, …) leave the cache's normal behaviour.
    pub fn from_headers<'a>(values: impl IntoIterator<Item = &'a str>) -> Self {
        let mut directive = Self::Normal;
        for token in values.into_iter().flat_map(|v| v.split(',')) {
            let (name, argument) = match token.split_once('=') {
                Some((name, argument)) => (name.trim(), Some(argument.trim().trim_matches('"'))),
                None => (token.trim(), None),
            };
            if name.eq_ignore_ascii_case("no-store") {
                return Self::Bypass;
            }
            let revalidate = name.eq_ignore_ascii_case("no-cache")
                || (name.eq_ignore_ascii_case("max-age") && argument.and_then(|a| a.parse::<u64>().ok()) == Some(0));
            if revalidate {
                directive = Self::Revalidate;
            }
        }
        directive
    }
}

/// What the `x-imagegate-cache` header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    Miss,
    Bypass,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Bypass => "bypass",
        }
    }
}

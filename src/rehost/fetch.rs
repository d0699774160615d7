//! The guarded downloader for upstream image URLs. A URL from an upstream answer is attacker-influenced
//! input (a compromised or misconfigured upstream could point anywhere), so every fetch is checked:
//!
//! - scheme `https` (or `http` when allowed) and a host on the allowlist, at every redirect hop;
//! - no private, loopback, link-local or otherwise non-public address, checked on IP literals and on every
//!   address a host name resolves to (in the resolver the connection itself uses, so DNS rebinding cannot
//!   slip past), unless the host is listed in `private_hosts`;
//! - few redirects, followed by hand; no proxy; one deadline for the whole download;
//! - a size cap enforced while streaming; a declared image content type and a PNG/JPEG/WebP signature.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt as _;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use sha2::{Digest as _, Sha256};
use url::Url;

use crate::config::DownloadSettings;
use crate::images::imageinfo::{self, ImageFormat};

/// Why an image could not be fetched. The texts are safe to show callers: they never contain the URL's query
/// (which carries the upstream's signature).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("the image URL is not a valid http(s) URL")]
    BadUrl,
    #[error("the image URL uses scheme '{0}'; only https is allowed")]
    Scheme(String),
    #[error("host '{0}' is not in images.download.allowed_hosts")]
    HostNotAllowed(String),
    #[error("host '{0}' points at a private or loopback address")]
    PrivateAddress(String),
    #[error("more than {0} redirects")]
    TooManyRedirects(usize),
    #[error("the image host answered HTTP {0}")]
    Status(u16),
    #[error("the image is larger than {0} bytes")]
    TooLarge(u64),
    #[error("the image host sent content type '{0}', not an image")]
    NotAnImage(String),
    #[error("the downloaded bytes are not a PNG, JPEG or WebP image")]
    BadSignature,
    #[error("the download took longer than {0:?}")]
    Timeout(Duration),
    #[error("the image host did not accept a connection within {0:?}")]
    ConnectTimeout(Duration),
    #[error("the image host could not be reached")]
    Unreachable,
}

/// A downloaded image (its bytes begin with a known image signature).
#[derive(Debug, Clone)]
pub struct Fetched {
    pub bytes: Bytes,
    /// The SHA-256 of `bytes`, computed chunk by chunk as they arrived (the store's content address).
    pub sha256: [u8; 32],
}

/// Host patterns: exact names (case-insensitive) or `*.suffix` for any subdomain of `suffix`.
#[derive(Debug, Clone, Default)]
struct HostRules(Vec<String>);

impl HostRules {
    fn new(patterns: &[String]) -> Self {
        Self(patterns.iter().map(|p| p.trim().trim_end_matches('.').to_ascii_lowercase()).collect())
    }

    fn matches(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.0.iter().any(|p| match p.strip_prefix("*.") {
            Some(suffix) => host.len() > suffix.len() + 1 && host.ends_with(&format!(".{suffix}")),
            None => *p == host,
        })
    }
}

/// True for addresses on the public internet. Rust's `IpAddr::is_global` is unstable, so the special-purpose
/// ranges (the IANA IPv4 and IPv6 special-purpose registries, RFC 6890 and friends) are listed here. IPv6 forms
/// that embed an IPv4 address (mapped, compatible, SIIT-translated, 6to4) are judged by that address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_documentation()
                || v4.is_multicast()
                || a == 0
                || a >= 240
                || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
                || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
                || (a == 192 && b == 88 && c == 99) // 6to4 relay anycast (deprecated)
                || (a == 198 && (18..20).contains(&b))) // benchmarking
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let embedded = |hi: u16, lo: u16| {
                let [a, b] = hi.to_be_bytes();
                let [c, d] = lo.to_be_bytes();
                is_public(IpAddr::V4(std::net::Ipv4Addr::new(a, b, c, d)))
            };
            match s {
                // ::ffff:a.b.c.d (IPv4-mapped)
                [0, 0, 0, 0, 0, 0xffff, hi, lo] => return embedded(hi, lo),
                // ::ffff:0:a.b.c.d (IPv4-translated, SIIT)
                [0, 0, 0, 0, 0xffff, 0, hi, lo] => return embedded(hi, lo),
                // ::a.b.c.d (IPv4-compatible, deprecated; also :: and ::1)
                [0, 0, 0, 0, 0, 0, hi, lo] => return embedded(hi, lo),
                // 2002:a.b.c.d::/48 (6to4): the host is reached through that IPv4 address
                [0x2002, hi, lo, ..] => return embedded(hi, lo),
                _ => {}
            }
            let first = s[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local
                || (first & 0xffc0) == 0xfe80 // link-local
                || (first & 0xffc0) == 0xfec0 // site-local (deprecated)
                || (first == 0x2001 && s[1] < 0x0200) // 2001::/23 IETF protocol assignments (Teredo, ORCHID, benchmarking…)
                || (first == 0x2001 && s[1] == 0x0db8) // documentation
                || (first & 0xfff0) == 0x3ff0 // 3fff::/20 documentation
                || (first == 0x0100 && s[1..4] == [0, 0, 0]) // 100::/64 discard-only
                || first == 0x0064) // NAT64 well-known and local-use prefixes
        }
    }
}

/// Resolves host names for the download client and drops the answer if any address is not public (unless the
/// host may be private). The client connects only to what this returns.
#[derive(Debug)]
struct GuardedResolver {
    private_ok: HostRules,
    /// The host of [`OwnLinks`], which may resolve anywhere (only its own links are ever requested from it).
    own_host: Option<String>,
}

/// The resolver's refusal, found again in the error chain of the failed request.
#[derive(Debug, thiserror::Error)]
#[error("host '{0}' resolves to a non-public address")]
struct PrivateResolution(String);

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        let private_ok =
            self.private_ok.matches(&host) || self.own_host.as_deref().is_some_and(|h| h.eq_ignore_ascii_case(&host));
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if !private_ok && addrs.iter().any(|a| !is_public(a.ip())) {
                return Err(Box::new(PrivateResolution(host)) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// The gateway's own links that re-hosting may download although they are on its own (often loopback,
/// plain-HTTP) address: the mock upstream's `/_mock/files/…`. Exactly this origin (scheme, host, port) and
/// path prefix are exempt from the allowlist, the private-address and the HTTPS rules; nothing else on that
/// host is, so a real upstream's link to `http://127.0.0.1:<port>/` stays refused.
#[derive(Debug, Clone)]
pub struct OwnLinks {
    scheme: String,
    host: String,
    port: Option<u16>,
    path_prefix: String,
}

impl OwnLinks {
    /// Links under `path_prefix` on the origin of `public_url`.
    pub fn new(public_url: &Url, path_prefix: &str) -> Option<Self> {
        Some(Self {
            scheme: public_url.scheme().to_owned(),
            host: public_url.host_str()?.to_owned(),
            port: public_url.port_or_known_default(),
            path_prefix: path_prefix.to_owned(),
        })
    }

    fn matches(&self, url: &Url) -> bool {
        url.scheme() == self.scheme
            && url.host_str().is_some_and(|h| h.eq_ignore_ascii_case(&self.host))
            && url.port_or_known_default() == self.port
            && url.path().starts_with(&self.path_prefix)
            && url.username().is_empty()
            && url.password().is_none()
    }
}

/// Downloads upstream images under the guards above. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    allowed: Arc<HostRules>,
    private_ok: Arc<HostRules>,
    allow_http: bool,
    max_bytes: u64,
    max_redirects: usize,
    timeout: Duration,
    /// Deadline for one TCP/TLS connect: the whole download's, at most [`MAX_CONNECT_TIMEOUT`].
    connect_timeout: Duration,
    own: Option<Arc<OwnLinks>>,
}

/// The longest a connect to an image host may take.
const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl Fetcher {
    pub fn new(settings: &DownloadSettings) -> anyhow::Result<Self> {
        Self::build(settings, settings.timeout.min(MAX_CONNECT_TIMEOUT), None)
    }

    /// A fetcher that also downloads the gateway's own links described by `own` (see [`OwnLinks`]).
    pub fn with_own_links(settings: &DownloadSettings, own: Option<OwnLinks>) -> anyhow::Result<Self> {
        Self::build(settings, settings.timeout.min(MAX_CONNECT_TIMEOUT), own)
    }

    fn build(settings: &DownloadSettings, connect_timeout: Duration, own: Option<OwnLinks>) -> anyhow::Result<Self> {
        let private_ok = HostRules::new(&settings.private_hosts);
        let own_host = own.as_ref().map(|o| o.host.clone());
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver { private_ok: private_ok.clone(), own_host }))
            .connect_timeout(connect_timeout)
            .user_agent(concat!("imagegate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| anyhow::anyhow!("cannot build the image download client: {e}"))?;
        Ok(Self {
            client,
            allowed: Arc::new(HostRules::new(&settings.allowed_hosts)),
            private_ok: Arc::new(private_ok),
            allow_http: settings.allow_http,
            max_bytes: settings.max_bytes.as_u64(),
            max_redirects: settings.max_redirects,
            timeout: settings.timeout,
            connect_timeout,
            own: own.map(Arc::new),
        })
    }

    /// Download the image at `url` into memory.
    pub async fn fetch(&self, url: &str) -> Result<Fetched, FetchError> {
        let mut download = self.open(url).await?;
        let mut body = BytesMut::with_capacity(
            usize::try_from(download.content_length.unwrap_or(0).min(self.max_bytes)).unwrap_or(0),
        );
        // Each chunk is hashed as it is copied in, while it is in the CPU's cache: the store needs the SHA-256,
        // and a second pass over megabytes (on a blocking thread) is what this saves.
        let mut hasher = Sha256::new();
        while let Some(chunk) = download.chunk().await? {
            hasher.update(&chunk);
            body.extend_from_slice(&chunk);
        }
        let bytes = body.freeze();
        imageinfo::sniff(&bytes).ok_or(FetchError::BadSignature)?;
        Ok(Fetched { bytes, sha256: hasher.finalize().into() })
    }

    /// Start downloading the image at `url`: every check up to its first byte done, the body to be read with
    /// [`Download::chunk`]. One deadline (`images.download.timeout`) covers both.
    pub async fn open(&self, url: &str) -> Result<Download, FetchError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let response = match tokio::time::timeout_at(deadline, self.respond(url)).await {
            Ok(response) => response?,
            Err(_) => return Err(FetchError::Timeout(self.timeout)),
        };
        let content_length = response.content_length();
        Ok(Download {
            stream: Box::pin(response.bytes_stream()),
            content_length,
            received: 0,
            max_bytes: self.max_bytes,
            deadline,
            timeout: self.timeout,
        })
    }

    /// Refuse a URL before connecting: scheme, allowlist, and IP literals that are not public.
    fn check(&self, url: &Url) -> Result<(), FetchError> {
        if self.own.as_ref().is_some_and(|own| own.matches(url)) {
            return Ok(());
        }
        match url.scheme() {
            "https" => {}
            "http" if self.allow_http => {}
            other => return Err(FetchError::Scheme(other.to_owned())),
        }
        let host = url.host_str().ok_or(FetchError::BadUrl)?;
        if !self.allowed.matches(host) {
            return Err(FetchError::HostNotAllowed(host.to_owned()));
        }
        let literal = match url.host() {
            Some(url::Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
            _ => None,
        };
        if let Some(ip) = literal
            && !is_public(ip)
            && !self.private_ok.matches(host)
        {
            return Err(FetchError::PrivateAddress(host.to_owned()));
        }
        Ok(())
    }

    /// The image host's answer to `url`, redirects followed under the checks, its status, declared type and
    /// declared length accepted.
    async fn respond(&self, url: &str) -> Result<reqwest::Response, FetchError> {
        let mut url = Url::parse(url).map_err(|_| FetchError::BadUrl)?;
        let mut redirects = 0;
        let response = loop {
            self.check(&url)?;
            let response =
                self.client.get(url.clone()).send().await.map_err(|e| classify(e, &url, self.connect_timeout))?;
            if !response.status().is_redirection() {
                break response;
            }
            redirects += 1;
            if redirects > self.max_redirects {
                return Err(FetchError::TooManyRedirects(self.max_redirects));
            }
            let location = response
                .headers()
                .get(http::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or(FetchError::Status(response.status().as_u16()))?;
            url = url.join(location).map_err(|_| FetchError::BadUrl)?;
        };
        if !response.status().is_success() {
            return Err(FetchError::Status(response.status().as_u16()));
        }
        let declared = response
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let essence = declared.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
        if ImageFormat::from_mime(&essence).is_none() && essence != "application/octet-stream" {
            return Err(FetchError::NotAnImage(if essence.is_empty() { "none".to_owned() } else { essence }));
        }
        if response.content_length().is_some_and(|len| len > self.max_bytes) {
            return Err(FetchError::TooLarge(self.max_bytes));
        }
        Ok(response)
    }
}

/// An image's body being downloaded: its chunks as they arrive, under the size cap and the download's deadline.
pub struct Download {
    stream: futures::stream::BoxStream<'static, reqwest::Result<Bytes>>,
    /// The length the host declared, if it did (already checked against the cap).
    pub content_length: Option<u64>,
    received: u64,
    max_bytes: u64,
    deadline: tokio::time::Instant,
    timeout: Duration,
}

impl Download {
    /// The next chunk of the image, `None` at its end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, FetchError> {
        let next = match tokio::time::timeout_at(self.deadline, self.stream.next()).await {
            Ok(next) => next,
            Err(_) => return Err(FetchError::Timeout(self.timeout)),
        };
        let Some(chunk) = next else { return Ok(None) };
        let chunk = chunk.map_err(|_| FetchError::Unreachable)?;
        self.received += chunk.len() as u64;
        if self.received > self.max_bytes {
            return Err(FetchError::TooLarge(self.max_bytes));
        }
        Ok(Some(chunk))
    }
}

/// Turn a client error into the reason callers see, recognising the resolver's refusal. The client sets no
/// overall timeout (the whole download's is `Fetcher::fetch`'s), so a timeout here is the connect's.
fn classify(e: reqwest::Error, url: &Url, connect_timeout: Duration) -> FetchError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(err) = source {
        if let Some(PrivateResolution(host)) = err.downcast_ref::<PrivateResolution>() {
            return FetchError::PrivateAddress(host.clone());
        }
        source = err.source();
    }
    if e.is_timeout() {
        return FetchError::ConnectTimeout(connect_timeout);
    }
    // reqwest's message names the URL, whose query is the upstream's signature: log the host only.
    let e = e.without_url();
    tracing::debug!(host = url.host_str().unwrap_or_default(), error = %e, "image download failed");
    FetchError::Unreachable
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_patterns_match_exact_names_and_subdomains_only() {
        let rules = HostRules::new(&["*.blob.core.windows.net".to_owned(), "Images.Example.com".to_owned()]);
        assert!(rules.matches("oaidalleapiprodscus.blob.core.windows.net"));
        assert!(rules.matches("a.b.blob.core.windows.net."));
        assert!(!rules.matches("blob.core.windows.net"), "the wildcard needs a subdomain");
        assert!(!rules.matches("evilblob.core.windows.net"));
        assert!(!rules.matches("blob.core.windows.net.evil.com"));
        assert!(rules.matches("images.example.com"));
        assert!(!rules.matches("x.images.example.com"));
    }

    #[test]
    fn special_purpose_addresses_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::7f00:1",
            "64:ff9b:1::a00:1",
            // IPv4-compatible and SIIT-translated forms of private addresses
            "::127.0.0.1",
            "::10.0.0.1",
            "::169.254.169.254",
            "::ffff:0:10.0.0.1",
            // 6to4 around a private address
            "2002:7f00:1::1",
            "2002:a9fe:a9fe::",
            "2002:c0a8:101::1",
            // site-local, Teredo, ORCHIDv2, benchmarking, documentation, discard-only
            "fec0::1",
            "feff::1",
            "2001::1",
            "2001:20::1",
            "2001:2::1",
            "2001:db8::1",
            "3fff::1",
            "100::1",
            "192.88.99.1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip} must not count as public");
        }
        for ip in ["20.60.1.1", "8.8.8.8", "2606:4700::1111", "2002:808:808::1", "::8.8.8.8", "2a00:1450::1"] {
            assert!(is_public(ip.parse().unwrap()), "{ip} is public");
        }
    }

    fn fetcher(allowed: &[&str], private: &[&str]) -> Fetcher {
        let settings = DownloadSettings {
            allowed_hosts: allowed.iter().map(|s| (*s).to_owned()).collect(),
            private_hosts: private.iter().map(|s| (*s).to_owned()).collect(),
            allow_http: true,
            ..DownloadSettings::default()
        };
        Fetcher::new(&settings).unwrap()
    }

    #[tokio::test]
    async fn refusals_happen_before_any_connection() {
        let f = fetcher(&["127.0.0.1", "169.254.169.254", "[::1]", "localhost"], &[]);
        // Nothing listens on these ports: a refusal other than Unreachable proves no connection was tried.
        assert_eq!(
            f.fetch("http://127.0.0.1:9/x.png").await.unwrap_err(),
            FetchError::PrivateAddress("127.0.0.1".into())
        );
        assert_eq!(
            f.fetch("http://169.254.169.254/latest/meta-data").await.unwrap_err(),
            FetchError::PrivateAddress("169.254.169.254".into())
        );
        assert_eq!(f.fetch("http://[::1]:9/x.png").await.unwrap_err(), FetchError::PrivateAddress("[::1]".into()));
        assert_eq!(
            f.fetch("http://localhost:9/x.png").await.unwrap_err(),
            FetchError::PrivateAddress("localhost".into())
        );
        assert_eq!(
            f.fetch("http://example.com/x.png").await.unwrap_err(),
            FetchError::HostNotAllowed("example.com".into())
        );
        assert_eq!(f.fetch("file:///etc/passwd").await.unwrap_err(), FetchError::Scheme("file".into()));
        assert_eq!(f.fetch("not a url").await.unwrap_err(), FetchError::BadUrl);
        for literal in ["http://[::127.0.0.1]/x.png", "http://[2002:7f00:1::1]/x.png", "http://[fec0::1]/x.png"] {
            let f = fetcher(&["[::7f00:1]", "[2002:7f00:1::1]", "[fec0::1]"], &[]);
            assert!(matches!(f.fetch(literal).await, Err(FetchError::PrivateAddress(_))), "{literal}");
        }
    }

    #[tokio::test]
    async fn a_download_comes_with_the_sha256_of_its_bytes() {
        let png = crate::upstream::render::render(3, 300, 300, crate::upstream::render::OutputFormat::Png).unwrap();
        let served = png.clone();
        let app = axum::Router::new().route(
            "/x.png",
            axum::routing::get(move || {
                let served = served.clone();
                // In several chunks, as a download over the network arrives.
                let chunks: Vec<Result<Bytes, std::io::Error>> =
                    served.chunks(1024).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
                async move {
                    (
                        [(http::header::CONTENT_TYPE, "image/png")],
                        axum::body::Body::from_stream(futures::stream::iter(chunks)),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let settings = DownloadSettings {
            allowed_hosts: vec!["127.0.0.1".into()],
            private_hosts: vec!["127.0.0.1".into()],
            allow_http: true,
            ..DownloadSettings::default()
        };
        let fetched = Fetcher::new(&settings).unwrap().fetch(&format!("http://{addr}/x.png")).await.unwrap();
        assert!(png.len() > 3 * 1024, "several chunks: {} bytes", png.len());
        assert_eq!(fetched.bytes, png);
        assert_eq!(fetched.sha256, <[u8; 32]>::from(Sha256::digest(&png)));
    }

    #[tokio::test]
    async fn a_connect_timeout_reports_the_deadline_that_fired() {
        // A listener whose accept queue is full: the kernel drops further SYNs, so a connect hangs.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let _filled: Vec<_> = (0..4)
            .filter_map(|_| std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok())
            .collect();
        let settings = DownloadSettings {
            allowed_hosts: vec!["127.0.0.1".into()],
            private_hosts: vec!["127.0.0.1".into()],
            allow_http: true,
            timeout: Duration::from_secs(5),
            ..DownloadSettings::default()
        };
        let f = Fetcher::build(&settings, Duration::from_millis(300), None).unwrap();
        let started = std::time::Instant::now();
        let err = f.fetch(&format!("http://{addr}/x.png")).await.unwrap_err();
        assert_eq!(err, FetchError::ConnectTimeout(Duration::from_millis(300)));
        assert_eq!(err.to_string(), "the image host did not accept a connection within 300ms");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}

//! Signed links to stored images: `{public_url}/images/files/{id}.{ext}?expires={unix}&signature={hmac}`.
//!
//! The signature is HMAC-SHA256 over the file name and the expiry, so a link cannot be guessed (the id is
//! 128 random bits and unsigned ids are refused) and a leaked link stops working when it expires. The key
//! comes from `images.signing_key`, or is generated once into `<data_dir>/signing.key`.

use std::io::Write as _;
use std::path::Path;

use url::Url;

use crate::signing::Signer;
use crate::wire::paths;

/// Why a link was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("the link's signature is missing or wrong")]
    BadSignature,
    #[error("the link has expired")]
    Expired,
}

/// Signs and checks image links.
#[derive(Clone)]
pub struct LinkSigner {
    signer: Signer,
    base: Url,
}

impl std::fmt::Debug for LinkSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkSigner").field("base", &self.base.as_str()).finish_non_exhaustive()
    }
}

impl LinkSigner {
    /// Links start with `base` (the gateway's public URL).
    pub fn new(key: impl Into<Vec<u8>>, base: Url) -> Self {
        Self { signer: Signer::new(key), base }
    }

    /// A key for another purpose, derived from this one (HMAC of `purpose`), so one configured secret serves
    /// several signers without any of them revealing it.
    pub fn derive(&self, purpose: &[u8]) -> Vec<u8> {
        self.signer.derive(purpose)
    }

    /// The link to file `name` (`{id}.{ext}`), valid until `expires` (Unix seconds).
    pub fn url(&self, name: &str, expires: i64) -> String {
        let signature = self.signer.sign(name, expires);
        let path = format!("{}/{name}", paths::IMAGE_FILES);
        paths::public_link(&self.base, &path, &format!("expires={expires}&signature={signature}"))
    }

    /// When `link` points at imagegate's own image files (under its public URL), the file name and the link's
    /// `expires` and `signature` as written (not checked: see [`LinkSigner::verify`]). `None` for any other URL.
    pub fn parse_own(&self, link: &str) -> Option<(String, Option<String>, Option<String>)> {
        if !(link.starts_with("https://") || link.starts_with("http://")) {
            return None;
        }
        let parsed = Url::parse(link).ok()?;
        let name = parsed.path_segments()?.next_back()?.to_owned();
        let expected =
            Url::parse(&paths::public_link(&self.base, &format!("{}/{name}", paths::IMAGE_FILES), "")).ok()?;
        if parsed.origin() != expected.origin() || parsed.path() != expected.path() || name.is_empty() {
            return None;
        }
        let query = |key: &str| parsed.query_pairs().find(|(k, _)| k == key).map(|(_, v)| v.into_owned());
        Some((name, query("expires"), query("signature")))
    }

    /// Check a link's signature (in constant time), then its expiry against `now` (Unix seconds). `expires`
    /// must be spelt as signed (no sign, no leading zeros): other spellings of the same number are refused.
    pub fn verify(
        &self,
        name: &str,
        expires: Option<&str>,
        signature: Option<&str>,
        now: i64,
    ) -> Result<(), LinkError> {
        let (Some(expires), Some(signature)) = (expires, signature) else { return Err(LinkError::BadSignature) };
        let expires_at = self.signer.check(name, expires, signature).ok_or(LinkError::BadSignature)?;
        if expires_at <= now { Err(LinkError::Expired) } else { Ok(()) }
    }
}

/// The configured key, or the one kept in `<data_dir>/signing.key` (created, readable by the owner only, on
/// first start).
pub fn load_or_create_key(configured: Option<&str>, data_dir: &Path) -> anyhow::Result<Vec<u8>> {
    if let Some(key) = configured {
        return Ok(key.as_bytes().to_vec());
    }
    let path = data_dir.join("signing.key");
    match std::fs::read_to_string(&path) {
        Ok(text) if text.trim().len() >= 32 => return Ok(text.trim().as_bytes().to_vec()),
        Ok(_) => anyhow::bail!("{} is shorter than 32 characters; delete it to generate a new one", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => anyhow::bail!("cannot read {}: {e}", path.display()),
    }
    std::fs::create_dir_all(data_dir)
        .map_err(|e| anyhow::anyhow!("cannot create data directory {}: {e}", data_dir.display()))?;
    let key = hex::encode(rand::random::<[u8; 32]>());
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&path).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
    file.write_all(key.as_bytes()).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    tracing::info!(path = %path.display(), "generated a link-signing key");
    Ok(key.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(key: &str) -> LinkSigner {
        LinkSigner::new(key.as_bytes().to_vec(), Url::parse("http://gw.example:8080/base/").unwrap())
    }

    fn parts(url: &str) -> (String, String, String) {
        let url = Url::parse(url).unwrap();
        let q: std::collections::HashMap<_, _> = url.query_pairs().into_owned().collect();
        let name = url.path_segments().unwrap().next_back().unwrap().to_owned();
        (name, q["expires"].clone(), q["signature"].clone())
    }

    #[test]
    fn a_signed_link_verifies_until_it_expires() {
        let s = signer("k".repeat(32).as_str());
        let url = s.url("abc.png", 2_000);
        assert!(url.starts_with("http://gw.example:8080/base/images/files/abc.png?expires=2000&signature="), "{url}");
        let (name, exp, sig) = parts(&url);
        assert_eq!(s.verify(&name, Some(&exp), Some(&sig), 1_999), Ok(()));
        assert_eq!(s.verify(&name, Some(&exp), Some(&sig), 2_000), Err(LinkError::Expired));
    }

    #[test]
    fn tampering_or_another_key_fails() {
        let s = signer("k".repeat(32).as_str());
        let (name, exp, sig) = parts(&s.url("abc.png", 2_000));
        assert_eq!(s.verify("abd.png", Some(&exp), Some(&sig), 0), Err(LinkError::BadSignature));
        assert_eq!(s.verify(&name, Some("2001"), Some(&sig), 0), Err(LinkError::BadSignature));
        assert_eq!(s.verify(&name, Some(&exp), None, 0), Err(LinkError::BadSignature));
        assert_eq!(s.verify(&name, Some(&exp), Some("AAAA"), 0), Err(LinkError::BadSignature));
        let other = signer("j".repeat(32).as_str());
        assert_eq!(other.verify(&name, Some(&exp), Some(&sig), 0), Err(LinkError::BadSignature));
        // The same number spelt otherwise is another link.
        for spelling in ["02000", "+2000", "002000", " 2000"] {
            assert_eq!(s.verify(&name, Some(spelling), Some(&sig), 0), Err(LinkError::BadSignature), "{spelling}");
        }
    }

    #[test]
    fn derived_keys_differ_by_purpose_and_by_key() {
        let s = signer("k".repeat(32).as_str());
        assert_eq!(s.derive(b"a"), s.derive(b"a"));
        assert_ne!(s.derive(b"a"), s.derive(b"b"));
        assert_ne!(s.derive(b"a"), signer("j".repeat(32).as_str()).derive(b"a"));
        assert_ne!(s.derive(b"a"), "k".repeat(32).into_bytes());
    }

    #[test]
    fn the_generated_key_is_kept_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create_key(None, dir.path()).unwrap();
        assert_eq!(first.len(), 64);
        assert_eq!(load_or_create_key(None, dir.path()).unwrap(), first);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.path().join("signing.key")).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "only the owner may read the key");
        }
        assert_eq!(load_or_create_key(Some("configured"), dir.path()).unwrap(), b"configured".to_vec());
    }
}

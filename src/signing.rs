//! HMAC-SHA256 signatures over a file name and an expiry: the one signer behind imagegate's re-hosted links
//! (`rehost::links`) and the offline mock's expiring links (`upstream::mock`).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac as _};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Signs `name` + expiry pairs with one secret key.
#[derive(Clone)]
pub struct Signer {
    key: Vec<u8>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").finish_non_exhaustive()
    }
}

impl Signer {
    pub fn new(key: impl Into<Vec<u8>>) -> Self {
        Self { key: key.into() }
    }

    fn mac(&self, parts: &[&[u8]]) -> HmacSha256 {
        // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
        let mut mac = HmacSha256::new_from_slice(&self.key).unwrap_or_else(|_| unreachable_hmac());
        for part in parts {
            mac.update(part);
        }
        mac
    }

    /// The URL-safe signature of `name` expiring at `expires` (Unix seconds).
    pub fn sign(&self, name: &str, expires: i64) -> String {
        let expires = expires.to_string();
        URL_SAFE_NO_PAD.encode(self.mac(&[name.as_bytes(), b"\n", expires.as_bytes()]).finalize().into_bytes())
    }

    /// The expiry `expires` spells when `signature` signs it and `name`, checked in constant time; `None` for
    /// a wrong signature or an expiry not spelt as signed (a sign or leading zeros).
    pub fn check(&self, name: &str, expires: &str, signature: &str) -> Option<i64> {
        let at: i64 = expires.parse().ok()?;
        if at.to_string() != expires {
            return None;
        }
        let given = URL_SAFE_NO_PAD.decode(signature).ok()?;
        self.mac(&[name.as_bytes(), b"\n", expires.as_bytes()]).verify_slice(&given).ok()?;
        Some(at)
    }

    /// A key for another purpose, derived from this one (HMAC of `purpose`), so one configured secret serves
    /// several signers without any of them revealing it.
    pub fn derive(&self, purpose: &[u8]) -> Vec<u8> {
        self.mac(&[purpose]).finalize().into_bytes().to_vec()
    }
}

#[expect(clippy::panic, reason = "HMAC accepts keys of every length; this cannot run")]
fn unreachable_hmac() -> HmacSha256 {
    panic!("HMAC rejected a key")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_checks_only_for_its_name_and_canonical_expiry() {
        let signer = Signer::new(b"k".to_vec());
        let sig = signer.sign("a.png", 100);
        assert_eq!(signer.check("a.png", "100", &sig), Some(100));
        assert_eq!(signer.check("b.png", "100", &sig), None);
        assert_eq!(signer.check("a.png", "0100", &sig), None);
        assert_eq!(signer.check("a.png", "+100", &sig), None);
        assert_eq!(Signer::new(b"other".to_vec()).check("a.png", "100", &sig), None);
    }
}

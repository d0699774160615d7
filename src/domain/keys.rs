//! Tenant key format: `ig_<id>_<secret>`, where the 8-character id is public (logs, usage, lookups) and the
//! 32-character secret is shown once. Only the SHA-256 of the whole key is kept.
//!
//! Keys carry ~190 bits of randomness, so a fast hash is enough (no password-stretching needed); lookups go
//! by id, and the hash is compared in constant time.

use rand::Rng;
use rand::distributions::Alphanumeric;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Every imagegate key starts with this, so leaked keys are recognisable by secret scanners.
pub const PREFIX: &str = "ig_";
const ID_LEN: usize = 8;
const SECRET_LEN: usize = 32;

/// A freshly generated key: give `key` to the tenant once; store only `id` and `sha256`.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub key: String,
    pub id: String,
    pub sha256: String,
}

/// A key as parsed from a header, before it is checked.
#[derive(Debug, PartialEq, Eq)]
pub struct PresentedKey<'a> {
    pub id: &'a str,
    pub full: &'a str,
}

/// Generate a new random key.
pub fn generate() -> NewKey {
    let mut rng = rand::thread_rng();
    let id: String = (0..ID_LEN)
        .map(|_| {
            let c = rng.sample(Alphanumeric) as char;
            c.to_ascii_lowercase()
        })
        .collect();
    let secret: String = (0..SECRET_LEN).map(|_| rng.sample(Alphanumeric) as char).collect();
    let key = format!("{PREFIX}{id}_{secret}");
    let sha256 = hash(&key);
    NewKey { key, id, sha256 }
}

/// Hex SHA-256 of a whole key.
pub fn hash(key: &str) -> String {
    crate::wire::hex(&Sha256::digest(key.as_bytes()))
}

/// True for a well-formed public key id.
pub fn is_valid_key_id(id: &str) -> bool {
    id.len() == ID_LEN && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Split a presented key into its id, or `None` if it is not in imagegate's format.
pub fn parse(token: &str) -> Option<PresentedKey<'_>> {
    let rest = token.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let secret_ok = secret.len() == SECRET_LEN && secret.bytes().all(|b| b.is_ascii_alphanumeric());
    (is_valid_key_id(id) && secret_ok).then_some(PresentedKey { id, full: token })
}

/// The stored hex hash of a key as bytes (what [`matches`] compares), or `None` if it is not 64 hex digits.
pub fn stored_hash(stored_sha256_hex: &str) -> Option<[u8; 32]> {
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(stored_sha256_hex, &mut bytes).ok().map(|()| bytes)
}

/// Constant-time comparison of a presented key against its stored hash ([`stored_hash`]).
pub fn matches(presented: &str, stored_sha256: &[u8; 32]) -> bool {
    let actual = Sha256::digest(presented.as_bytes());
    actual.as_slice().ct_eq(stored_sha256).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_and_match_their_hash() {
        let k = generate();
        let parsed = parse(&k.key).unwrap();
        assert_eq!(parsed.id, k.id);
        let stored = |hex: &str| stored_hash(hex).unwrap();
        assert!(matches(&k.key, &stored(&k.sha256)));
        assert!(!matches(&k.key, &stored(&generate().sha256)));
        assert!(!k.sha256.contains(&k.key[12..]));
    }

    #[test]
    fn malformed_tokens_are_rejected() {
        for bad in [
            "",
            "sk-abc",
            "ig_",
            "ig_abcdefgh",
            "ig_ABCDEFGH_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "ig_abcdefgh_short",
            "ig_abcdefgh_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!",
        ] {
            assert!(parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn malformed_stored_hash_is_no_hash() {
        for bad in ["not-hex", "abc", &"g".repeat(64), &"a".repeat(62), &"a".repeat(66)] {
            assert!(stored_hash(bad).is_none(), "{bad}");
        }
    }
}

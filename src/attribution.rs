//! What the upstream learns about who is asking, beyond the credentials: identifiers derived per tenant so
//! tenants sharing one upstream account can neither collide nor impersonate each other.
//!
//! - Idempotency keys: the caller's `Idempotency-Key` is sent as an HMAC of (tenant, key), so two tenants that
//!   pick the same key never get each other's answer from the upstream.
//! - End users: OpenAI's `user` field (abuse monitoring) is sent as an HMAC of the tenant and, when the caller
//!   sent one, of the caller's own `user` within that tenant: stable, opaque, never the tenant's name or key.
//!   One tenant's abuse is then attributed to that tenant (and its user), not to the whole shared account.
//!
//! The HMAC key is derived from `images.signing_key`, so replicas sharing it send the same identifiers and
//! nobody without it can compute another tenant's.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// What the upstream receives as `user`. Per deployment (`[attribution] end_user`) and per tenant
/// (`images.end_user` in its policy).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndUser {
    /// An opaque id derived from the tenant (and the caller's own `user`, hashed within the tenant).
    #[default]
    Derived,
    /// The caller's `user` as sent (or none): for deployments with one tenant, or whose tenants are trusted to
    /// send ids that are already opaque.
    PassThrough,
}

/// Derives the identifiers. Cheap to clone.
#[derive(Clone)]
pub struct Attributor {
    /// The HMAC keyed once (its two key blocks hashed at startup); each identifier clones it.
    keyed: Option<Hmac<Sha256>>,
}

impl std::fmt::Debug for Attributor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Attributor(..)")
    }
}

impl Attributor {
    pub fn new(key: Vec<u8>) -> Self {
        Self { keyed: Hmac::<Sha256>::new_from_slice(&key).ok() }
    }

    fn mac(&self, parts: &[&[u8]]) -> String {
        let Some(mut mac) = self.keyed.clone() else { return String::new() };
        for part in parts {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        crate::wire::hex(&mac.finalize().into_bytes()[..16])
    }

    /// The `Idempotency-Key` sent upstream for `caller`'s key within tenant `tenant_id`.
    pub fn idempotency_key(&self, tenant_id: &str, caller: &str) -> String {
        format!("ig-{}", self.mac(&[b"idempotency", tenant_id.as_bytes(), caller.as_bytes()]))
    }

    /// The `user` sent upstream for tenant `tenant_id` and the caller's own `user`, if any.
    pub fn end_user(&self, tenant_id: &str, caller_user: Option<&str>) -> String {
        match caller_user {
            Some(user) => format!("ig-{}", self.mac(&[b"user", tenant_id.as_bytes(), user.as_bytes()])),
            None => format!("ig-{}", self.mac(&[b"tenant", tenant_id.as_bytes()])),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_stable_opaque_and_scoped_to_the_tenant() {
        let a = Attributor::new(b"k".to_vec());
        assert_eq!(a.end_user("t1", None), a.end_user("t1", None));
        assert_ne!(a.end_user("t1", None), a.end_user("t2", None));
        assert_ne!(a.end_user("t1", Some("alice")), a.end_user("t2", Some("alice")));
        assert_ne!(a.end_user("t1", Some("alice")), a.end_user("t1", None));
        assert_ne!(a.idempotency_key("t1", "k-1"), a.idempotency_key("t2", "k-1"));
        assert!(!a.end_user("t1", Some("alice")).contains("alice"));
        let other = Attributor::new(b"another deployment".to_vec());
        assert_ne!(a.end_user("t1", None), other.end_user("t1", None));
    }
}

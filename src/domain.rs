//! Domain types with no I/O and no HTTP: tenants and the identity a request carries, their limits and
//! policies, the key format, and the rules every tenant setting must satisfy. Everything above reads them;
//! they import nothing of the crate but each other.

pub mod keys;
pub mod limits;
pub mod policy;
pub mod rules;
pub mod tenant;

pub use self::limits::{BucketReport, Limits, OnBackendError, Report};
pub use self::policy::{CachePolicy, DownloadFallback, ImagePolicy, ResponseFormat, Scope};
pub use self::tenant::{Tenant, TenantContext, TenantStatus};

/// The longest model name accepted anywhere (the usage ledger stores as much).
pub const MAX_MODEL_CHARS: usize = 128;

//! Time as the limits see it: wall clock for budget windows, monotonic clock for buckets.

use super::*;

/// Time as the limits see it: the wall clock names budget windows (UTC days and months, as the ledger's
/// timestamps do); the monotonic one drives buckets, so a wall-clock jump never blocks or frees a tenant.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn wall_ms(&self) -> u64;
    /// Milliseconds on a clock that never goes back.
    fn mono_ms(&self) -> u64;
}

/// A clock the backends share.
pub type SharedClock = Arc<dyn Clock>;

/// The system's clocks.
pub(super) struct SystemClock {
    pub(super) started: Instant,
}

impl Clock for SystemClock {
    fn wall_ms(&self) -> u64 {
        u64::try_from(crate::time::now_ms()).unwrap_or(0)
    }

    fn mono_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// The system clock.
pub fn system_clock() -> SharedClock {
    Arc::new(SystemClock { started: Instant::now() })
}

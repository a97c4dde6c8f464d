//! Manager settings, in code or from `UMM_*` environment variables.

use std::time::Duration;

use crate::error::{Error, Result};

/// Manager settings. The cache limits apply to each device separately.
///
/// ```
/// let config = umm::Config { max_cached_entries: 1024, ..umm::Config::default() };
/// let manager = umm::Manager::new(config);
/// assert_eq!(manager.config().max_cached_entries, 1024);
/// ```
#[derive(Clone, Debug)]
pub struct Config {
    /// Bytes a device may keep registered before unreferenced entries are evicted
    /// (least recently used first). Pinned entries are never evicted, so pins can exceed
    /// it; the excess is evicted as soon as their pins drop. Default: 8 GiB.
    pub max_cached_bytes: u64,
    /// Registrations a device may keep before unreferenced entries are evicted.
    /// Default: 131072.
    pub max_cached_entries: usize,
    /// How long a miss on a device that refuses overlaps waits for an overlapping pinned
    /// entry to be released before failing with [`Error::DeviceRangeBusy`].
    /// Default: 200 ms.
    pub busy_timeout: Duration,
    /// Whether a miss checks that the range is mapped (one `msync(MS_ASYNC)`) before
    /// registering it, so an unmapped range fails with [`Error::Unmapped`] instead of an
    /// opaque backend error or, worse, a registration of nothing. On a device whose backend
    /// fails on unmapped memory itself ([`crate::Capabilities::rejects_unmapped`], verbs)
    /// the check runs only after such a failure, to name the cause. Default: true.
    pub check_mapped: bool,
    /// Whether the cache is on. Off, a registration is deregistered as soon as its last
    /// pin drops, so the next pin of the range registers afresh (the behaviour of a
    /// library without a cache; `UMM_CACHE=0`, like `UCX_RCACHE_ENABLE=n`). Concurrent
    /// pins of one range still share its registration. Default: true.
    pub cache: bool,
    /// Print the [`crate::Stats`] to standard error when the manager is dropped (as Open
    /// MPI's `rcache_grdma_print_stats`; `UMM_STATS=1`). Default: false.
    pub stats_at_exit: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_cached_bytes: 8 << 30,
            max_cached_entries: 1 << 17,
            busy_timeout: Duration::from_millis(200),
            check_mapped: true,
            cache: true,
            stats_at_exit: false,
        }
    }
}

/// The environment variables [`Config::from_env`] reads, with what each sets.
pub const ENV_VARS: &[(&str, &str)] = &[
    (
        "UMM_MAX_CACHED_BYTES",
        "max_cached_bytes: bytes, with an optional K/M/G/T suffix (powers of 1024)",
    ),
    ("UMM_MAX_CACHED_ENTRIES", "max_cached_entries: a count"),
    (
        "UMM_BUSY_TIMEOUT_MS",
        "busy_timeout: milliseconds a no-overlap device waits for a pinned overlap",
    ),
    (
        "UMM_CHECK_MAPPED",
        "check_mapped: 1/0 (also true/false, yes/no, on/off)",
    ),
    (
        "UMM_CACHE",
        "cache: 1/0; 0 registers on every pin (no cache)",
    ),
];

impl Config {
    /// The defaults, overridden by the `UMM_*` variables set in the environment (see
    /// [`ENV_VARS`]). A variable that is set but malformed is an error naming it, not
    /// silently ignored.
    ///
    /// ```
    /// std::env::set_var("UMM_MAX_CACHED_BYTES", "64M");
    /// let config = umm::Config::from_env().unwrap();
    /// assert_eq!(config.max_cached_bytes, 64 << 20);
    /// std::env::remove_var("UMM_MAX_CACHED_BYTES");
    /// ```
    pub fn from_env() -> Result<Config> {
        Config::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`Config::from_env`] over any lookup (tests, configuration files).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config> {
        let mut c = Config::default();
        let bad = |name: &'static str, value: &str, expected: &'static str| Error::Config {
            variable: name,
            value: value.to_string(),
            expected,
        };
        if let Some(v) = lookup("UMM_MAX_CACHED_BYTES") {
            c.max_cached_bytes = parse_bytes(&v).ok_or_else(|| {
                bad(
                    "UMM_MAX_CACHED_BYTES",
                    &v,
                    "a byte count with an optional K/M/G/T suffix",
                )
            })?;
        }
        if let Some(v) = lookup("UMM_MAX_CACHED_ENTRIES") {
            c.max_cached_entries = v
                .trim()
                .parse()
                .map_err(|_| bad("UMM_MAX_CACHED_ENTRIES", &v, "a count"))?;
        }
        if let Some(v) = lookup("UMM_BUSY_TIMEOUT_MS") {
            c.busy_timeout = Duration::from_millis(
                v.trim()
                    .parse()
                    .map_err(|_| bad("UMM_BUSY_TIMEOUT_MS", &v, "milliseconds"))?,
            );
        }
        if let Some(v) = lookup("UMM_CHECK_MAPPED") {
            c.check_mapped = parse_bool(&v).ok_or_else(|| bad("UMM_CHECK_MAPPED", &v, "1 or 0"))?;
        }
        if let Some(v) = lookup("UMM_STATS") {
            c.stats_at_exit = parse_bool(&v).ok_or_else(|| bad("UMM_STATS", &v, "1 or 0"))?;
        }
        if let Some(v) = lookup("UMM_CACHE") {
            c.cache = parse_bool(&v).ok_or_else(|| bad("UMM_CACHE", &v, "1 or 0"))?;
        }
        Ok(c)
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" | "y" => Some(true),
        "0" | "false" | "no" | "off" | "n" => Some(false),
        _ => None,
    }
}

fn parse_bytes(v: &str) -> Option<u64> {
    let v = v.trim();
    let (digits, shift) = match v.char_indices().last()? {
        (i, 'k' | 'K') => (&v[..i], 10),
        (i, 'm' | 'M') => (&v[..i], 20),
        (i, 'g' | 'G') => (&v[..i], 30),
        (i, 't' | 'T') => (&v[..i], 40),
        _ => (v, 0),
    };
    digits.trim().parse::<u64>().ok()?.checked_mul(1 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_lookup_parses_and_names_bad_values() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let c = Config::from_lookup(env(&[
            ("UMM_MAX_CACHED_BYTES", "2G"),
            ("UMM_MAX_CACHED_ENTRIES", "77"),
            ("UMM_BUSY_TIMEOUT_MS", "5"),
            ("UMM_CHECK_MAPPED", "off"),
            ("UMM_CACHE", "0"),
        ]))
        .unwrap();
        assert_eq!(c.max_cached_bytes, 2 << 30);
        assert_eq!(c.max_cached_entries, 77);
        assert_eq!(c.busy_timeout, Duration::from_millis(5));
        assert!(!c.check_mapped && !c.cache);
        let e = Config::from_lookup(env(&[("UMM_MAX_CACHED_ENTRIES", "lots")])).unwrap_err();
        assert!(e.to_string().contains("UMM_MAX_CACHED_ENTRIES"), "{e}");
        assert!(Config::from_lookup(env(&[("UMM_MAX_CACHED_BYTES", "99999999999T")])).is_err());
        let d = Config::from_lookup(|_| None).unwrap();
        assert_eq!(d.max_cached_entries, Config::default().max_cached_entries);
    }
}

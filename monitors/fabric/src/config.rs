//! [`Config`]: the environment variables umm-fabric reads.

use std::time::Duration;

use umm_kmod::{KmodSource, NotifyDevice};
use umm_uffd::{Options, UffdSource};

use crate::error::FabricError;
use crate::monitor::Source;

/// Which notifier source `UMM_SOURCE` asks for (the names umm-auto uses).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SourceChoice {
    /// The kernel module where it is loaded, else userfaultfd.
    #[default]
    Auto,
    /// Only the kernel module.
    Kmod,
    /// Only userfaultfd (strict: memory it cannot protect is refused).
    Uffd,
}

impl std::str::FromStr for SourceChoice {
    type Err = FabricError;

    fn from_str(s: &str) -> Result<SourceChoice, FabricError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(SourceChoice::Auto),
            "kmod" | "module" | "kernel" => Ok(SourceChoice::Kmod),
            "uffd" | "userfaultfd" => Ok(SourceChoice::Uffd),
            _ => Err(FabricError::BadEnv {
                var: "UMM_SOURCE",
                value: s.to_string(),
                expected: "auto, kmod or uffd (interposition cannot serve libfabric's cache \
                           from here, and `none` would leave it unprotected)",
            }),
        }
    }
}

/// umm-fabric's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// `UMM_SOURCE`: the notifier source.
    pub source: SourceChoice,
    /// `UMM_FABRIC_INTERVAL_MS`: the longest the monitor thread sleeps between looks at
    /// the source (default 100 ms). Only the release of unused stale registrations waits
    /// for it: cache hits check the source themselves.
    pub interval: Duration,
    /// `UMM_FABRIC_VERBOSE`: print one line to standard error when the monitor starts
    /// (which source) and when installing fails in the `LD_PRELOAD` constructor.
    pub verbose: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            source: SourceChoice::Auto,
            interval: Duration::from_millis(100),
            verbose: false,
        }
    }
}

fn var(name: &'static str) -> Result<Option<String>, FabricError> {
    match std::env::var(name) {
        Ok(v) => Ok(Some(v)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(v)) => Err(FabricError::BadEnv {
            var: name,
            value: v.to_string_lossy().into_owned(),
            expected: "valid UTF-8",
        }),
    }
}

/// Parses a boolean the way umm does (`1/0`, `true/false`, `yes/no`, `on/off`).
pub(crate) fn parse_bool(name: &'static str, v: &str) -> Result<bool, FabricError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(FabricError::BadEnv {
            var: name,
            value: v.to_string(),
            expected: "1/0, true/false, yes/no or on/off",
        }),
    }
}

impl Config {
    /// The defaults with the `UMM_SOURCE`, `UMM_FABRIC_INTERVAL_MS` and
    /// `UMM_FABRIC_VERBOSE` variables that are set applied; a malformed value is an error.
    pub fn from_env() -> Result<Config, FabricError> {
        let mut c = Config::default();
        if let Some(v) = var("UMM_SOURCE")? {
            c.source = v.parse()?;
        }
        if let Some(v) = var("UMM_FABRIC_INTERVAL_MS")? {
            let ms: u64 =
                v.trim()
                    .parse()
                    .ok()
                    .filter(|&ms| ms > 0)
                    .ok_or(FabricError::BadEnv {
                        var: "UMM_FABRIC_INTERVAL_MS",
                        value: v.clone(),
                        expected: "a positive number of milliseconds",
                    })?;
            c.interval = Duration::from_millis(ms);
        }
        if let Some(v) = var("UMM_FABRIC_VERBOSE")? {
            c.verbose = parse_bool("UMM_FABRIC_VERBOSE", &v)?;
        }
        Ok(c)
    }

    /// Opens the source this configuration names.
    pub fn open_source(&self) -> Result<Source, FabricError> {
        let kmod = || KmodSource::open().map(|s| Source::Kmod(std::sync::Arc::new(s)));
        let uffd = || UffdSource::new(Options::default()).map(Source::Uffd);
        match self.source {
            SourceChoice::Kmod => kmod().map_err(FabricError::Kmod),
            SourceChoice::Uffd => uffd().map_err(FabricError::Uffd),
            SourceChoice::Auto => {
                let why_not_kmod = if NotifyDevice::is_available() {
                    match kmod() {
                        Ok(s) => return Ok(s),
                        Err(e) => e.to_string(),
                    }
                } else {
                    "/dev/umm_notify is absent (module not loaded)".to_string()
                };
                uffd().map_err(|e| FabricError::NoSource {
                    kmod: why_not_kmod,
                    uffd: e.to_string(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_names_match_umm_auto_and_refuse_what_cannot_serve_libfabric() {
        assert_eq!("".parse::<SourceChoice>().unwrap(), SourceChoice::Auto);
        assert_eq!(
            " Kmod ".parse::<SourceChoice>().unwrap(),
            SourceChoice::Kmod
        );
        assert_eq!(
            "kernel".parse::<SourceChoice>().unwrap(),
            SourceChoice::Kmod
        );
        assert_eq!(
            "userfaultfd".parse::<SourceChoice>().unwrap(),
            SourceChoice::Uffd
        );
        for bad in ["interpose", "none", "off", "kmodx"] {
            let e = bad.parse::<SourceChoice>().unwrap_err();
            assert!(
                matches!(
                    e,
                    FabricError::BadEnv {
                        var: "UMM_SOURCE",
                        ..
                    }
                ),
                "{bad}: {e:?}"
            );
        }
    }

    #[test]
    fn booleans_parse_like_umm_and_garbage_is_an_error() {
        for t in ["1", "true", "YES", "on"] {
            assert!(parse_bool("X", t).unwrap(), "{t}");
        }
        for f in ["0", "false", "No", "off"] {
            assert!(!parse_bool("X", f).unwrap(), "{f}");
        }
        assert!(parse_bool("X", "maybe").is_err());
    }
}

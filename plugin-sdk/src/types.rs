//! The types every plugin meets whatever its hooks: the error a hook returns,
//! the error the key-value store returns, log levels and the config map.
//! Plain Rust mirrors of the WIT `types` interface; the conversions to the
//! generated types live in `glue.rs`.

use std::fmt;
use std::str::FromStr;

/// Why a hook call (or `init`) failed.
///
/// The gateway applies the plugin's on-error policy (`fail-open` or
/// `fail-closed`) to every case alike; the case and its text are logged and
/// counted. Mirrors the WIT variant `hook-error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookError {
    /// The input is not something this plugin can handle, e.g. an event type
    /// it does not know how to format.
    InvalidInput(String),
    /// The plugin's config is missing a key or holds a bad value.
    BadConfig(String),
    /// A host call (such as the key-value store) failed.
    HostFailure(String),
    /// Anything else.
    Other(String),
}

impl HookError {
    /// An [`HookError::InvalidInput`] with this message.
    pub fn invalid_input(message: impl Into<String>) -> Self {
        Self::InvalidInput(message.into())
    }

    /// A [`HookError::BadConfig`] with this message.
    pub fn bad_config(message: impl Into<String>) -> Self {
        Self::BadConfig(message.into())
    }

    /// A [`HookError::HostFailure`] with this message.
    pub fn host_failure(message: impl Into<String>) -> Self {
        Self::HostFailure(message.into())
    }

    /// A [`HookError::Other`] with this message.
    pub fn other(message: impl Into<String>) -> Self {
        Self::Other(message.into())
    }

    /// The text carried by whichever case this is.
    pub fn message(&self) -> &str {
        match self {
            Self::InvalidInput(m) | Self::BadConfig(m) | Self::HostFailure(m) | Self::Other(m) => m,
        }
    }
}

impl fmt::Display for HookError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidInput(m) => write!(f, "invalid input: {m}"),
            Self::BadConfig(m) => write!(f, "bad config: {m}"),
            Self::HostFailure(m) => write!(f, "host failure: {m}"),
            Self::Other(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for HookError {}

/// A failed key-value call is a host failure, so `?` works inside hooks.
impl From<KvError> for HookError {
    fn from(e: KvError) -> Self {
        Self::HostFailure(format!("key-value store: {e}"))
    }
}

/// Why a key-value operation failed. Mirrors the WIT variant `kv-error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvError {
    /// The key is empty or longer than 512 bytes.
    BadKey(String),
    /// The value is larger than the store accepts (1 MiB); carries the size.
    TooLarge(u64),
    /// The plugin's store holds more than its quota allows.
    QuotaExceeded(String),
    /// The gateway's storage failed.
    Storage(String),
    /// Anything else.
    Other(String),
}

impl fmt::Display for KvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadKey(m) => write!(f, "bad key: {m}"),
            Self::TooLarge(n) => write!(f, "value too large: {n} bytes"),
            Self::QuotaExceeded(m) => write!(f, "quota exceeded: {m}"),
            Self::Storage(m) => write!(f, "storage failed: {m}"),
            Self::Other(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for KvError {}

/// Severity of a log line written through [`host::log`](crate::host::log).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LogLevel {
    /// Very detailed tracing.
    Trace,
    /// Debugging detail.
    Debug,
    /// Normal operation.
    Info,
    /// Something unexpected that the plugin handled.
    Warn,
    /// Something failed.
    Error,
}

/// The plugin's config map, as written under its `[[plugins]]` entry in the
/// gateway's config file (every value is a string).
///
/// Handed to [`Plugin::init`](crate::Plugin::init) and returned by
/// [`host::config`](crate::host::config). Build one in unit tests with
/// [`Config::from_pairs`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    /// In the order the gateway gave them; a later duplicate wins in `get`.
    entries: Vec<(String, String)>,
}

impl Config {
    /// A config holding these key-value pairs.
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self {
            entries: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The value of `key`, or a [`HookError::BadConfig`] naming the missing key.
    pub fn require(&self, key: &str) -> Result<&str, HookError> {
        self.get(key)
            .ok_or_else(|| HookError::BadConfig(format!("missing config key `{key}`")))
    }

    /// The value of `key` parsed as `T`, `None` if unset, or a
    /// [`HookError::BadConfig`] if it does not parse.
    pub fn get_parsed<T>(&self, key: &str) -> Result<Option<T>, HookError>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        self.get(key)
            .map(|raw| {
                raw.trim()
                    .parse::<T>()
                    .map_err(|e| HookError::BadConfig(format!("config key `{key}` = {raw:?}: {e}")))
            })
            .transpose()
    }

    /// The value of `key` parsed as `T`, or a [`HookError::BadConfig`] if it is
    /// missing or does not parse.
    pub fn require_parsed<T>(&self, key: &str) -> Result<T, HookError>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        self.get_parsed(key)?
            .ok_or_else(|| HookError::BadConfig(format!("missing config key `{key}`")))
    }

    /// Every key and value, in the gateway's order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// How many entries there are.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Config {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Self::from_pairs(iter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_lookups() {
        let c = Config::from_pairs([("a", "1"), ("b", "x"), ("a", "2")]);
        assert_eq!(c.get("a"), Some("2"));
        assert_eq!(c.get("zz"), None);
        assert_eq!(c.require_parsed::<i64>("a"), Ok(2));
        assert!(matches!(c.require("zz"), Err(HookError::BadConfig(m)) if m.contains("zz")));
        assert!(matches!(
            c.get_parsed::<i64>("b"),
            Err(HookError::BadConfig(_))
        ));
        assert_eq!(c.get_parsed::<i64>("zz"), Ok(None));
        assert_eq!(c.len(), 3);
    }

    #[test]
    fn kv_errors_become_host_failures() {
        let e: HookError = KvError::TooLarge(5).into();
        assert_eq!(
            e,
            HookError::HostFailure("key-value store: value too large: 5 bytes".into())
        );
    }
}

//! Paths of the plugin components the tests load, built by `tests/build.rs`
//! from `tests/plugins/` (purpose-built test plugins), `example-plugins/`
//! (the Rust examples) and, through `example-plugins/build-nonrust.sh`, the
//! JavaScript and Python examples. One `&str` constant per component, named
//! after its crate or file (`echo-formatter` → [`ECHO_FORMATTER`]), holding
//! the absolute path of its `.wasm`; [`ALL`] lists them all.
//!
//! This module only names files: it builds nothing at test time, and it is
//! not the plugin runtime (that is the gateway's).

include!(concat!(env!("OUT_DIR"), "/plugins.rs"));

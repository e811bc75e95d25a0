//! The Rust SDK for plugboard plugins.
//!
//! The plugin contract (the WIT package `plugboard:plugin`), the trait per
//! hook and the export macro arrive with the plugin runtime; until then this
//! crate exports nothing, so nothing can be built against an unfinished API.

//! The wit-bindgen output the SDK is built on. Hidden: plugin authors use the
//! plain types and traits at the crate root; only [`export_plugin!`] reaches
//! in here.
//!
//! Why four small worlds rather than the four worlds of `wit/plugboard.wit`:
//! wit-bindgen names each exported interface's `#[macro_export]` helper after
//! the interface alone, so generating two worlds that both export `plugin`
//! (every world does) in one crate defines the same macro twice. Each world
//! below therefore exports exactly one interface, so every helper exists
//! once. A plugin exports `base` plus the hooks of its world, and the
//! component linker merges the worlds' type sections into that world
//! (`base` + `formatter-hook` is `plugboard:plugin/formatter`, and so on), so
//! the component exports exactly what the `formatter`, `filter`, `control`
//! or `full` world declares.
//!
//! `pub_export_macro` keeps the full world description (imports and exports)
//! out of this crate: it is emitted only where `export_plugin!` expands, so a
//! formatter does not claim to export a filter.
//!
//! [`export_plugin!`]: crate::export_plugin

#![allow(unsafe_code, missing_docs, unreachable_pub, clippy::all)]

/// `plugin` (init) plus the shared `types` and `host` modules.
pub mod base {
    wit_bindgen::generate!({
        path: "../wit",
        inline: "
            package plugboard:sdk;
            world base {
                import plugboard:plugin/host@0.1.0;
                export plugboard:plugin/plugin@0.1.0;
            }
        ",
        world: "plugboard:sdk/base",
        generate_all,
        pub_export_macro: true,
        default_bindings_module: "plugboard_plugin_sdk::__private::bindings::base",
    });
}

/// The `webhook-formatter` hook.
pub mod formatter {
    wit_bindgen::generate!({
        path: "../wit",
        inline: "
            package plugboard:sdk;
            world formatter-hook {
                import plugboard:plugin/host@0.1.0;
                export plugboard:plugin/webhook-formatter@0.1.0;
            }
        ",
        world: "plugboard:sdk/formatter-hook",
        with: {
            "plugboard:plugin/types@0.1.0": super::base::plugboard::plugin::types,
            "plugboard:plugin/host@0.1.0": super::base::plugboard::plugin::host,
        },
        pub_export_macro: true,
        default_bindings_module: "plugboard_plugin_sdk::__private::bindings::formatter",
    });
}

/// The `conversation-filter` hook.
pub mod filter {
    wit_bindgen::generate!({
        path: "../wit",
        inline: "
            package plugboard:sdk;
            world filter-hook {
                import plugboard:plugin/host@0.1.0;
                export plugboard:plugin/conversation-filter@0.1.0;
            }
        ",
        world: "plugboard:sdk/filter-hook",
        with: {
            "plugboard:plugin/types@0.1.0": super::base::plugboard::plugin::types,
            "plugboard:plugin/host@0.1.0": super::base::plugboard::plugin::host,
        },
        pub_export_macro: true,
        default_bindings_module: "plugboard_plugin_sdk::__private::bindings::filter",
    });
}

/// The `control-handler` hook.
pub mod control {
    wit_bindgen::generate!({
        path: "../wit",
        inline: "
            package plugboard:sdk;
            world control-hook {
                import plugboard:plugin/host@0.1.0;
                export plugboard:plugin/control-handler@0.1.0;
            }
        ",
        world: "plugboard:sdk/control-hook",
        with: {
            "plugboard:plugin/types@0.1.0": super::base::plugboard::plugin::types,
            "plugboard:plugin/host@0.1.0": super::base::plugboard::plugin::host,
        },
        pub_export_macro: true,
        default_bindings_module: "plugboard_plugin_sdk::__private::bindings::control",
    });
}

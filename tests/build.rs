//! Builds the plugins the integration tests load, and tells the harness
//! where they are.
//!
//! - `example-plugins/` (the Rust examples) and `tests/plugins/` (the
//!   purpose-built test plugins) are separate Cargo workspaces. Each is built
//!   with `cargo build --release --target wasm32-wasip2` by the same cargo
//!   that runs this script, into `<target>/wasm-plugins/` rather than the
//!   outer target folder, whose lock the outer build holds. The two share
//!   that folder (they run one after the other), so wit-bindgen's proc
//!   macro and the SDK are compiled once for both.
//! - `example-plugins/build-nonrust.sh`, when present, builds the JavaScript
//!   and Python examples into `<target>/wasm-plugins/nonrust/`.
//! - `$OUT_DIR/plugins.rs` gets one `pub const NAME: &str = "/abs/path.wasm";`
//!   per component; `harness/plugins.rs` includes it.
//!
//! A plugin that does not build fails this build, with the child's output.
//! Not done here: checking that every built plugin is used by a test.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::{env, fs};

const WASM_TARGET: &str = "wasm32-wasip2";

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let root = manifest_dir
        .parent()
        .expect("tests/ has a parent: the workspace root")
        .to_path_buf();
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let plugin_target = target_dir(&root, &out_dir).join("wasm-plugins");

    // What to watch: the plugin contract and the SDK every Rust plugin uses.
    watch(&root.join("wit"));
    watch(&root.join("plugin-sdk/Cargo.toml"));
    watch(&root.join("plugin-sdk/src"));

    // Constant name → (where it came from, absolute path of the .wasm).
    let mut plugins: BTreeMap<String, (String, PathBuf)> = BTreeMap::new();

    for workspace in ["example-plugins", "tests/plugins"] {
        let dir = root.join(workspace);
        let members = workspace_members(&dir);
        watch(&dir.join("Cargo.toml"));
        watch(&dir.join("Cargo.lock"));
        // Whole member folders: a member may take its source from elsewhere
        // (`[lib] path`), and build output goes to the workspace's target.
        for (_, member_dir) in &members {
            watch(member_dir);
        }

        let output = cargo_build(&dir, &plugin_target);
        if !output.status.success() {
            fail(
                &format!(
                    "building the plugins of {workspace} for {WASM_TARGET} failed \
                     (if `core` or `std` cannot be found: `rustup target add {WASM_TARGET}`)"
                ),
                &output,
            );
        }
        let release = plugin_target.join(WASM_TARGET).join("release");
        for (package, member_dir) in members {
            let file = release.join(format!("{}.wasm", package.replace('-', "_")));
            if !file.is_file() {
                panic!(
                    "{workspace}: building {package} produced no {} (is it a cdylib?)",
                    file.display()
                );
            }
            let from = member_dir
                .strip_prefix(&root)
                .unwrap_or(&member_dir)
                .display()
                .to_string();
            add(&mut plugins, const_name(&package), from, file);
        }
    }

    // The JavaScript and Python examples, built by their own script.
    let examples = root.join("example-plugins");
    let script = examples.join("build-nonrust.sh");
    for dir in ["js", "python"] {
        watch_sources(&examples.join(dir));
    }
    if script.is_file() {
        watch(&script);
        let out = plugin_target.join("nonrust");
        fs::create_dir_all(&out).expect("create the non-Rust plugin folder");
        let output = Command::new("bash")
            .arg(&script)
            .arg(&out)
            .current_dir(&root)
            .output()
            .expect("run bash example-plugins/build-nonrust.sh");
        if !output.status.success() {
            fail(
                "example-plugins/build-nonrust.sh failed (toolchains: scripts/install-plugin-toolchains)",
                &output,
            );
        }
        let mut built: Vec<PathBuf> = fs::read_dir(&out)
            .expect("read the non-Rust plugin folder")
            .map(|entry| entry.expect("read a directory entry").path())
            .filter(|p| p.is_file() && p.extension() == Some(OsStr::new("wasm")))
            .filter(|p| !file_name(p).starts_with('.'))
            .collect();
        built.sort();
        for file in built {
            let stem = file
                .file_stem()
                .and_then(OsStr::to_str)
                .expect("a UTF-8 file name")
                .to_owned();
            add(
                &mut plugins,
                const_name(&stem),
                "example-plugins/build-nonrust.sh".to_owned(),
                file,
            );
        }
    }

    let mut code = String::from(
        "// Generated by tests/build.rs: the plugins the tests load, built for wasm32-wasip2.\n",
    );
    for (name, (from, file)) in &plugins {
        let path = file.to_str().expect("a UTF-8 path for a built plugin");
        writeln!(code, "\n/// `{from}`, built as a component.").unwrap();
        writeln!(code, "pub const {name}: &str = {path:?};").unwrap();
    }
    code.push_str(
        "\n/// Every plugin above as (constant name, path).\npub const ALL: &[(&str, &str)] = &[\n",
    );
    for name in plugins.keys() {
        writeln!(code, "    ({name:?}, {name}),").unwrap();
    }
    code.push_str("];\n");
    let generated = out_dir.join("plugins.rs");
    // Rewrite only on change, so an unchanged list does not look new.
    if fs::read_to_string(&generated).ok().as_deref() != Some(code.as_str()) {
        fs::write(&generated, code).expect("write $OUT_DIR/plugins.rs");
    }
}

/// The outer build's target folder: the ancestor of `OUT_DIR` that cargo
/// tagged with `CACHEDIR.TAG`, else `<root>/target`.
fn target_dir(root: &Path, out_dir: &Path) -> PathBuf {
    out_dir
        .ancestors()
        .find(|dir| dir.join("CACHEDIR.TAG").is_file())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| root.join("target"))
}

/// `cargo build --release --target wasm32-wasip2` in `workspace`, with the
/// cargo that runs this script and without the outer build's settings.
fn cargo_build(workspace: &Path, target_dir: &Path) -> Output {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .args([
            "build",
            "--release",
            "--target",
            WASM_TARGET,
            "--color",
            "never",
        ])
        .current_dir(workspace);
    for (key, _) in env::vars_os() {
        if let Some(key) = key.to_str() {
            if inherited_from_outer_build(key) {
                command.env_remove(key);
            }
        }
    }
    command.env("CARGO_TARGET_DIR", target_dir);
    command
        .output()
        .unwrap_or_else(|e| panic!("run cargo for {}: {e}", workspace.display()))
}

/// Variables that cargo sets for a build script, or that configure the
/// outer build, and would change or break a wasm32 build of another
/// workspace: flags for the host target (RUSTFLAGS, coverage
/// instrumentation), clippy's wrapper, the outer target folder and profile
/// settings, the outer package's metadata. Kept: the jobserver
/// (`CARGO_MAKEFLAGS`), cargo's home, network, registry and terminal
/// settings, `RUSTC` and `RUSTC_WRAPPER`.
fn inherited_from_outer_build(key: &str) -> bool {
    const KEEP: &[&str] = &[
        "CARGO_HOME",
        "CARGO_MAKEFLAGS",
        "CARGO_BUILD_JOBS",
        "CARGO_NET_",
        "CARGO_HTTP_",
        "CARGO_REGISTRIES_",
        "CARGO_REGISTRY_",
        "CARGO_TERM_",
    ];
    const DROP: &[&str] = &[
        "RUSTFLAGS",
        "RUSTDOCFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_LINKER",
        "OUT_DIR",
        "TARGET",
        "HOST",
        "NUM_JOBS",
        "OPT_LEVEL",
        "PROFILE",
        "DEBUG",
        "CARGO",
    ];
    if key.starts_with("__CARGO") || DROP.contains(&key) {
        return true;
    }
    key.starts_with("CARGO_")
        && !KEEP
            .iter()
            .any(|k| key == *k || (k.ends_with('_') && key.starts_with(k)))
}

/// The packages of a plugin workspace: every folder holding a Cargo.toml,
/// as (package name, folder).
fn workspace_members(workspace: &Path) -> Vec<(String, PathBuf)> {
    let mut members = Vec::new();
    let entries =
        fs::read_dir(workspace).unwrap_or_else(|e| panic!("read {}: {e}", workspace.display()));
    for entry in entries {
        let dir = entry.expect("read a directory entry").path();
        let manifest = dir.join("Cargo.toml");
        if !dir.is_dir() || !manifest.is_file() {
            continue;
        }
        let text = fs::read_to_string(&manifest)
            .unwrap_or_else(|e| panic!("read {}: {e}", manifest.display()));
        let name = text
            .lines()
            .filter_map(|line| line.trim().strip_prefix("name"))
            .filter_map(|rest| rest.trim_start().strip_prefix('='))
            .map(|value| value.trim().trim_matches('"').to_owned())
            .next()
            .unwrap_or_else(|| panic!("{} names no package", manifest.display()));
        members.push((name, dir));
    }
    members.sort();
    members
}

/// `echo-formatter` → `ECHO_FORMATTER`; anything not alphanumeric becomes `_`.
fn const_name(stem: &str) -> String {
    let mut name: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        name.insert(0, '_');
    }
    name
}

fn add(
    plugins: &mut BTreeMap<String, (String, PathBuf)>,
    name: String,
    from: String,
    file: PathBuf,
) {
    if name == "ALL" {
        panic!("a plugin from {from} would be called ALL, which the list of all plugins uses");
    }
    if let Some((other, _)) = plugins.get(&name) {
        panic!("two plugins would share the constant {name}: {other} and {from}");
    }
    plugins.insert(name, (from, file));
}

fn file_name(path: &Path) -> &str {
    path.file_name().and_then(OsStr::to_str).unwrap_or("")
}

fn watch(path: &Path) {
    println!("cargo:rerun-if-changed={}", path.display());
}

/// Watches the source files under `dir`, one by one, skipping installed
/// toolchains and build output (node_modules, .venv, caches, .wasm), which
/// change when things are built and would make every build rerun this
/// script. A file added to a folder is noticed at the next change of a
/// watched file.
fn watch_sources(dir: &Path) {
    const SKIP_DIRS: &[&str] = &["node_modules", "target", "dist", "__pycache__"];
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = file_name(&path);
        if name.starts_with('.') && name != ".gitignore" {
            continue;
        }
        if path.is_dir() {
            if !SKIP_DIRS.contains(&name) {
                watch_sources(&path);
            }
        } else if !name.ends_with(".wasm") && !name.ends_with(".pyc") {
            watch(&path);
        }
    }
}

fn fail(what: &str, output: &Output) -> ! {
    eprintln!("{what}");
    eprintln!(
        "--- stdout ---\n{}",
        String::from_utf8_lossy(&output.stdout)
    );
    eprintln!(
        "--- stderr ---\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Exit rather than panic: the child's output is the message, and a
    // backtrace of this script would only bury it.
    std::process::exit(1);
}

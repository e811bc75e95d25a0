//! The wasmtime engine shared by every plugin: component model, epoch
//! interruption, the pooling allocator where the machine allows it (on-demand
//! allocation otherwise), a linker with WASI p2 and the `host` interface, and
//! an on-disk cache of compiled components keyed by content hash and engine.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::bindings::{Full, PluginState};
use super::PluginError;

/// Largest `memory_limit` a plugin may have (the size of a pooled memory slot).
pub const MAX_PLUGIN_MEMORY: usize = 512 * 1024 * 1024;

/// How often the epoch advances; plugin deadlines are checked at this grain.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// The result of compiling or loading one component.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub component: Component,
    /// Hex SHA-256 of the component bytes.
    pub sha256: String,
    /// Whether it came from the on-disk cache.
    pub cached: bool,
    pub took: Duration,
}

/// The engine, linker and compile cache.
pub struct PluginEngine {
    pub engine: Engine,
    pub linker: Linker<PluginState>,
    cache_dir: Option<PathBuf>,
    /// Distinguishes artifacts of other wasmtime versions or engine settings.
    fingerprint: String,
    /// Whether the pooling allocator is in use.
    pub pooling: bool,
}

fn base_config() -> Config {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    // Component-model async is not used; without it reused calls are cheaper.
    config.concurrency_support(false);
    config.cranelift_opt_level(wasmtime::OptLevel::Speed);
    config
}

fn pooling() -> PoolingAllocationConfig {
    let mut p = PoolingAllocationConfig::default();
    p.total_component_instances(128)
        .total_core_instances(1024)
        .total_memories(256)
        .total_tables(512)
        .max_memories_per_component(16)
        .max_tables_per_component(16)
        .max_core_instances_per_component(64)
        .max_memory_size(MAX_PLUGIN_MEMORY)
        .max_component_instance_size(1 << 20)
        .max_core_instance_size(1 << 20);
    p
}

impl PluginEngine {
    /// Builds the engine; `cache_dir` is where compiled components are kept.
    pub fn new(cache_dir: Option<PathBuf>) -> Result<Arc<PluginEngine>, PluginError> {
        let mut config = base_config();
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling()));
        let (engine, pooling) = match Engine::new(&config) {
            Ok(e) => (e, true),
            Err(e) => {
                tracing::warn!(error = %e, "pooling allocator unavailable; using on-demand allocation");
                let engine =
                    Engine::new(&base_config()).map_err(|e| PluginError::Engine(e.to_string()))?;
                (engine, false)
            }
        };
        let mut linker = Linker::<PluginState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| PluginError::Engine(e.to_string()))?;
        Full::add_to_linker::<PluginState, HasSelf<PluginState>>(&mut linker, |s| s)
            .map_err(|e| PluginError::Engine(e.to_string()))?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        let fingerprint = format!("{:016x}", h.finish());
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("plugboard-plugin-epoch".into())
            .spawn(move || loop {
                std::thread::sleep(EPOCH_TICK);
                match weak.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => break,
                }
            })
            .map_err(|e| PluginError::Engine(e.to_string()))?;
        Ok(Arc::new(PluginEngine {
            engine,
            linker,
            cache_dir,
            fingerprint,
            pooling,
        }))
    }

    /// Removes the compiled artifact of the component with `sha256` from the
    /// cache: a version that was refused after it compiled must not stay
    /// there (every refused upload would add one, for good).
    pub fn discard(&self, sha256: &str) {
        if let Some(path) = self.cache_path(sha256) {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove a refused plugin's compiled artifact")
                }
            }
        }
    }

    fn cache_path(&self, sha256: &str) -> Option<PathBuf> {
        self.cache_dir
            .as_ref()
            .map(|d| d.join(format!("{sha256}-{}.cwasm", self.fingerprint)))
    }

    /// Compiles `bytes`, or loads the compiled artifact from the cache.
    /// Blocking: call it off the async runtime.
    pub fn compile(&self, bytes: &[u8]) -> Result<Compiled, PluginError> {
        let started = Instant::now();
        let sha256 = crate::hex(&Sha256::digest(bytes));
        if let Some(path) = self.cache_path(&sha256) {
            if path.exists() {
                // SAFETY: the cache folder holds only artifacts this gateway
                // serialised itself, named by the content hash of their source
                // and by this engine's compatibility fingerprint.
                #[allow(unsafe_code)]
                match unsafe { Component::deserialize_file(&self.engine, &path) } {
                    Ok(component) => {
                        return Ok(Compiled {
                            component,
                            sha256,
                            cached: true,
                            took: started.elapsed(),
                        })
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "discarding unusable compiled plugin");
                        let _ = std::fs::remove_file(&path);
                    }
                }
            }
        }
        let component = Component::new(&self.engine, bytes)
            .map_err(|e| PluginError::Compile(format!("{e:#}")))?;
        if let Some(path) = self.cache_path(&sha256) {
            if let Err(e) = write_artifact(&path, &component) {
                tracing::warn!(path = %path.display(), error = %e, "cannot cache compiled plugin");
            }
        }
        Ok(Compiled {
            component,
            sha256,
            cached: false,
            took: started.elapsed(),
        })
    }
}

fn write_artifact(path: &Path, component: &Component) -> anyhow::Result<()> {
    let bytes = component.serialize().map_err(|e| anyhow::anyhow!("{e}"))?;
    write_replacing(path, &bytes)?;
    Ok(())
}

/// Replaces the file at `path` with `bytes`: written to a new temporary
/// file beside it, then renamed over it, so a reader sees the old file or
/// the new one, never half of one. The temporary file has an unguessable
/// name and is created exclusively without following symlinks, so nobody
/// who can write in the folder can aim the write at another file by
/// planting a link or a file under the name first. Blocking.
pub fn write_replacing(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o644)
        .open(&tmp)?;
    let written = file.write_all(bytes).and_then(|()| file.sync_all());
    drop(file);
    match written.and_then(|()| std::fs::rename(&tmp, path)) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_file_is_a_new_plain_file_and_a_link_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "untouched").unwrap();
        let path = dir.path().join("plugin.wasm");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        write_replacing(&path, b"new bytes").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
        assert!(std::fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_file());
        assert_eq!(std::fs::read(&path).unwrap(), b"new bytes");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "no temporary file is left: {names:?}");
    }
}

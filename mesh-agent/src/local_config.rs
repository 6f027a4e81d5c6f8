//! `mesh-agent local`'s configuration source: a YAML file (and the files it includes) holding
//! nodes, workloads, services and CRD-shaped policies, turned into a [`ClusterModel`].
//!
//! [`LocalConfigSource::load`] reads and validates once. [`LocalConfigSource::watch`] polls the
//! files and publishes each new *valid* model on a `tokio::sync::watch` channel; an invalid edit
//! is logged with all its errors and the last good model stays published. Format, errors and
//! reload behaviour: `docs/local-mode.md`.
//!
//! Why polling and not inotify: the files are small (at most [`MAX_FILE_BYTES`]), editors
//! replace files by rename (which breaks a watch on the old inode), and a poll of a few files per
//! second costs nothing; it keeps the dependency list short too.

mod parse;
mod watch;

use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::model::{ClusterInput, ClusterModel, ModelError, Origin};

pub use parse::{ParsedFile, parse_str};
pub use watch::{DEFAULT_POLL_INTERVAL, LocalConfigWatch, ReloadStatus};

/// `apiVersion` of the local file's cluster documents.
pub const LOCAL_API_VERSION: &str = "local.nodemesh.io/v1alpha1";
/// `kind` of the local file's cluster documents.
pub const LOCAL_KIND: &str = "LocalCluster";
/// Largest file the loader reads: a bound on memory and on the work of one poll.
pub const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// One problem with the configuration, in the form `file:line:column: path: why` where the
/// parser knows the position, else `file: path: why`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {why}")]
    Read { file: String, why: String },
    #[error("{file}: {size} bytes is more than the {MAX_FILE_BYTES} a config file may have")]
    TooLarge { file: String, size: u64 },
    #[error("{file}:{line}:{column}: {message}")]
    Syntax {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{file}: {message}")]
    Document { file: String, message: String },
    #[error("{0}")]
    Model(Box<ModelError>),
}

/// Every problem found in one load, in file order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} error(s) in the local config:", self.0.len())?;
        for e in &self.0 {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

/// Merges parsed files into one input. `this_node` overrides the files' `thisNode`.
pub fn merge(
    files: Vec<ParsedFile>,
    this_node: Option<&str>,
) -> Result<ClusterInput, Vec<ConfigError>> {
    let mut errors = Vec::new();
    let mut input = ClusterInput::default();
    let mut this_node_at: Option<(String, Origin)> = None;
    let mut root_at: Option<(String, Origin)> = None;
    for file in files {
        for (slot, values, field) in [
            (&mut this_node_at, file.this_node, "thisNode"),
            (&mut root_at, file.root_namespace, "rootNamespace"),
        ] {
            for (value, origin) in values {
                match slot {
                    Some((first, first_at)) if *first != value => {
                        errors.push(ConfigError::Document {
                            file: origin.file.clone(),
                            message: format!(
                                "{field}: `{value}` contradicts `{first}` set in {}",
                                first_at.file
                            ),
                        })
                    }
                    Some(_) => {}
                    None => *slot = Some((value, origin)),
                }
            }
        }
        input.nodes.extend(file.nodes);
        input.workloads.extend(file.workloads);
        input.services.extend(file.services);
        input
            .authorization_policies
            .extend(file.authorization_policies);
        input.peer_authentications.extend(file.peer_authentications);
    }
    input.this_node = this_node
        .map(str::to_owned)
        .or(this_node_at.map(|(v, _)| v));
    input.root_namespace = root_at.map(|(v, _)| v);
    if errors.is_empty() {
        Ok(input)
    } else {
        Err(errors)
    }
}

/// Parses, merges and validates texts already read: `(name, text)`, the main file first.
/// Includes are not followed (the loader does that).
pub fn build_from_texts(
    files: &[(String, String)],
    this_node: Option<&str>,
) -> Result<ClusterModel, ConfigErrors> {
    let mut errors = Vec::new();
    let mut parsed = Vec::new();
    for (name, text) in files {
        match parse_str(name, text) {
            Ok(p) => parsed.push(p),
            Err(mut e) => errors.append(&mut e),
        }
    }
    finish(parsed, errors, this_node)
}

fn finish(
    parsed: Vec<ParsedFile>,
    mut errors: Vec<ConfigError>,
    this_node: Option<&str>,
) -> Result<ClusterModel, ConfigErrors> {
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    let input = merge(parsed, this_node).map_err(ConfigErrors)?;
    ClusterModel::build(&input).map_err(|e| {
        errors.extend(e.into_iter().map(|e| ConfigError::Model(Box::new(e))));
        ConfigErrors(errors)
    })
}

/// The local file as a source of cluster models.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalConfigSource {
    path: PathBuf,
    this_node: Option<String>,
}

/// The result of one load: the model or the errors, and every file it read (for the watcher).
struct Attempt {
    result: Result<ClusterModel, ConfigErrors>,
    files: Vec<PathBuf>,
    fingerprint: u64,
}

impl LocalConfigSource {
    /// `path`: the main file. `this_node`: overrides the file's `thisNode` (so several agents
    /// can share one file).
    pub fn new(path: impl Into<PathBuf>, this_node: Option<String>) -> Self {
        LocalConfigSource {
            path: path.into(),
            this_node,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the main file and its includes and validates them into a model.
    pub fn load(&self) -> Result<Arc<ClusterModel>, ConfigErrors> {
        self.attempt().result.map(Arc::new)
    }

    fn attempt(&self) -> Attempt {
        let mut hasher = DefaultHasher::new();
        let mut files = vec![self.path.clone()];
        let mut errors = Vec::new();
        let mut parsed = Vec::new();
        let main = read_file(&self.path, &mut hasher);
        let main_name = self.path.display().to_string();
        match main.and_then(|text| parse_str(&main_name, &text)) {
            Err(mut e) => errors.append(&mut e),
            Ok(main) => {
                let dir = self.path.parent().unwrap_or(Path::new("."));
                let includes = main.include.clone();
                parsed.push(main);
                for (include, origin) in includes {
                    let path = dir.join(&include);
                    files.push(path.clone());
                    let name = path.display().to_string();
                    match read_file(&path, &mut hasher).and_then(|t| parse_str(&name, &t)) {
                        Err(mut e) => errors.append(&mut e),
                        Ok(p) if !p.include.is_empty() => errors.push(ConfigError::Document {
                            file: name,
                            message: format!(
                                "include: only the main file may include files (this one is \
                                 included by {}: {})",
                                origin.file, origin.path
                            ),
                        }),
                        Ok(p) => parsed.push(p),
                    }
                }
            }
        }
        Attempt {
            result: finish(parsed, errors, self.this_node.as_deref()),
            files,
            fingerprint: hasher.finish(),
        }
    }

    /// Loads once and starts polling every `interval` (see [`LocalConfigWatch`]). Fails if the
    /// first load fails: an agent does not start without a valid model. Must be called within
    /// a tokio runtime.
    pub fn watch(self, interval: std::time::Duration) -> Result<LocalConfigWatch, ConfigErrors> {
        watch::spawn(self, interval)
    }
}

/// Reads one file (bounded), feeding its bytes (or the error) to the fingerprint.
fn read_file(path: &Path, hasher: &mut DefaultHasher) -> Result<String, Vec<ConfigError>> {
    path.hash(hasher);
    match read_bounded(path) {
        Ok(bytes) => {
            bytes.hash(hasher);
            String::from_utf8(bytes).map_err(|e| {
                vec![ConfigError::Read {
                    file: path.display().to_string(),
                    why: format!("not UTF-8 text: {e}"),
                }]
            })
        }
        Err(e) => {
            e.to_string().hash(hasher);
            Err(vec![e])
        }
    }
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, ConfigError> {
    let name = || path.display().to_string();
    let read_error = |e: std::io::Error| ConfigError::Read {
        file: name(),
        why: e.to_string(),
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let size = file.metadata().map_err(read_error)?.len();
    if size > MAX_FILE_BYTES {
        return Err(ConfigError::TooLarge { file: name(), size });
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(ConfigError::TooLarge {
            file: name(),
            size: bytes.len() as u64,
        });
    }
    Ok(bytes)
}

/// The fingerprint of `files` as they are now (the same hash [`LocalConfigSource`] computes
/// while loading).
fn fingerprint(files: &[PathBuf]) -> u64 {
    let mut hasher = DefaultHasher::new();
    for f in files {
        let _ = read_file(f, &mut hasher);
    }
    hasher.finish()
}

#[cfg(test)]
mod tests;

//! Which parts of the file system a backup covers: the chosen paths, the
//! directories above them, and what the exclude patterns leave out.

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

use crate::error::{Error, Result};

/// Decides which paths are left out. A pattern with a `/` matches the whole
/// absolute path; one without matches any file or directory name.
#[derive(Debug, Clone)]
pub struct Excluder {
    names: GlobSet,
    paths: GlobSet,
}

impl Excluder {
    pub fn new(patterns: &[String]) -> Result<Self> {
        let mut names = GlobSetBuilder::new();
        let mut paths = GlobSetBuilder::new();
        for p in patterns {
            let trimmed = p.trim_end_matches('/');
            if trimmed.is_empty() {
                return Err(Error::Invalid(format!("exclude pattern {p:?} matches nothing")));
            }
            let glob = GlobBuilder::new(trimmed)
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .map_err(|e| Error::BadPattern {
                    pattern: p.clone(),
                    source: e,
                })?;
            if trimmed.contains('/') {
                paths.add(glob);
            } else {
                names.add(glob);
            }
        }
        let build = |b: GlobSetBuilder| {
            b.build().map_err(|e| Error::BadPattern {
                pattern: patterns.join(" "),
                source: e,
            })
        };
        Ok(Excluder {
            names: build(names)?,
            paths: build(paths)?,
        })
    }

    /// No pattern at all: the walker then skips building the path it would
    /// match (a glob set allocates for every candidate, even when empty).
    pub fn is_empty(&self) -> bool {
        self.names.is_empty() && self.paths.is_empty()
    }

    pub fn is_excluded(&self, path: &Path, name: &[u8]) -> bool {
        (!self.names.is_empty() && self.names.is_match(Path::new(std::ffi::OsStr::from_bytes(name))))
            || (!self.paths.is_empty() && self.paths.is_match(path))
    }
}

/// Which parts of the file system a backup covers: every given path, and the
/// directories above them (recorded with their own metadata, nothing else).
#[derive(Debug)]
pub(super) enum Selection {
    All,
    Some(BTreeMap<Vec<u8>, Selection>),
}

pub(super) fn normalize(path: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(path).map_err(|e| Error::io("resolve", path, e))?;
    let mut out = PathBuf::from("/");
    for c in abs.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    Ok(out)
}

/// Where the snapshot path `path` (absolute, normalized) is read from.
pub(super) fn on_disk(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

pub(super) fn build_selection(paths: &[PathBuf]) -> Selection {
    let mut root = Selection::Some(BTreeMap::new());
    for p in paths {
        let comps: Vec<Vec<u8>> = p
            .components()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(n.as_bytes().to_vec()),
                _ => None,
            })
            .collect();
        let mut cur = &mut root;
        for c in comps {
            cur = match cur {
                Selection::All => break,
                Selection::Some(map) => map.entry(c).or_insert_with(|| Selection::Some(BTreeMap::new())),
            };
        }
        *cur = Selection::All;
    }
    root
}

//! Listing a snapshot's entries below a path, depth-first in name order
//! like `find`, one directory at a time so memory stays that of one tree
//! per level.

use crate::error::{Error, Result};
use crate::id::BlobId;
use crate::repository::Repository;
use crate::tree::Node;

/// Holds the repository as a reference or an `Arc`, whichever the caller has.
pub struct Lister<R> {
    repo: R,
    /// Directories still to list, the next one last.
    stack: Vec<(BlobId, String)>,
    /// The entry asked for, when the path named a file.
    single: Option<(String, Node)>,
}

impl<R: std::ops::Deref<Target = Repository>> Lister<R> {
    /// Lists every entry at or below `path` (`/` or `None` for all) in the tree `root`.
    pub async fn new(repo: R, root: BlobId, path: Option<&str>) -> Result<Lister<R>> {
        let mut tree_id = root;
        let mut prefix = String::new();
        let wanted: Vec<&str> = path
            .unwrap_or("/")
            .split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .collect();
        for (i, comp) in wanted.iter().enumerate() {
            let tree = repo.load_tree(&tree_id).await?;
            let node = tree
                .find(comp.as_bytes())
                .ok_or_else(|| Error::NoSuchPath(path.unwrap_or_default().to_string()))?;
            prefix = format!("{prefix}/{}", node.name_lossy());
            match node.subtree {
                Some(sub) => tree_id = sub,
                None if i + 1 == wanted.len() => {
                    return Ok(Lister {
                        repo,
                        stack: Vec::new(),
                        single: Some((prefix, node.clone())),
                    });
                }
                None => {
                    return Err(Error::Invalid(format!(
                        "{prefix} is not a directory in the snapshot"
                    )));
                }
            }
        }
        Ok(Lister {
            repo,
            stack: vec![(tree_id, prefix)],
            single: None,
        })
    }

    /// The entries of the next directory (with their full paths), or `None`
    /// at the end.
    pub async fn next_batch(&mut self) -> Result<Option<Vec<(String, Node)>>> {
        if let Some(one) = self.single.take() {
            return Ok(Some(vec![one]));
        }
        let Some((id, dir)) = self.stack.pop() else {
            return Ok(None);
        };
        let tree = self.repo.load_tree(&id).await?;
        let mut subdirs = Vec::new();
        let mut out = Vec::with_capacity(tree.nodes.len());
        for n in tree.nodes {
            let path = format!("{dir}/{}", n.name_lossy());
            if let Some(sub) = n.subtree {
                subdirs.push((sub, path.clone()));
            }
            out.push((path, n));
        }
        self.stack.extend(subdirs.into_iter().rev());
        Ok(Some(out))
    }
}

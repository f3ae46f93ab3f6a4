//! The assembler: builds each directory's tree in walk order, from the
//! walker's entries and the readers' chunk lists, and stores it.

use crossbeam_channel::{Receiver, Sender};

use super::read::NewChunk;
use super::walk::Item;
use super::{Counts, PackerMsg, Shared};
use crate::chunk::{self, Compressor};
use crate::error::{Error, Result};
use crate::id::BlobId;
use crate::pack::BlobType;
use crate::repository::encode;
use crate::tree::{Node, NodeKind, Tree};

/// Builds trees in walk order: waits for each file's chunk list, stores each
/// directory's tree when the walker leaves it, and finally the root.
pub(super) fn assemble(
    shared: &Shared<'_>,
    items: Receiver<Vec<Item>>,
    packer: Sender<Vec<PackerMsg>>,
    asked: Option<Sender<Vec<NewChunk>>>,
    level: i32,
) -> Result<(BlobId, Counts)> {
    let mut compressor = Compressor::new(level)?;
    let mut counts = Counts::default();
    let mut stack: Vec<(Option<Node>, Vec<Node>)> = vec![(None, Vec::new())];
    let mut store_tree = |nodes: Vec<Node>| -> Result<BlobId> {
        let mut tree = Tree { nodes };
        tree.nodes.sort_by(|a, b| a.name.cmp(&b.name));
        let bytes = encode(&tree)?;
        let id = chunk::blob_id(shared.store.chunk_keys(), &bytes);
        if !shared.is_new(&id) {
            return Ok(id);
        }
        if let Some(asked) = &asked {
            // The store may hold this tree already (an unchanged directory).
            if let Some(b) = &shared.asking {
                b.take(bytes.len(), || shared.aborted())?;
            }
            asked
                .send(vec![NewChunk {
                    kind: BlobType::Tree,
                    id,
                    data: bytes,
                }])
                .map_err(|_| Error::Interrupted("the backup stopped".into()))?;
        } else {
            let payload = compressor.compress(&bytes);
            packer
                .send(vec![PackerMsg {
                    kind: BlobType::Tree,
                    id,
                    payload,
                    raw_len: bytes.len() as u32,
                }])
                .map_err(|_| Error::Interrupted("the packer stopped".into()))?;
        }
        Ok(id)
    };
    for item in items.iter().flatten() {
        match item {
            Item::EnterDir(node) => stack.push((Some(node), Vec::new())),
            Item::ExitDir => {
                let (node, children) = stack
                    .pop()
                    .ok_or_else(|| Error::Interrupted("walker sent an unbalanced tree".into()))?;
                let mut node = node.ok_or_else(|| Error::Interrupted("walker left the root".into()))?;
                node.subtree = Some(store_tree(children)?);
                counts.dirs += 1;
                top(&mut stack)?.push(node);
            }
            Item::Leaf(node) => {
                match node.kind {
                    NodeKind::File => {
                        counts.files += 1;
                        counts.bytes += node.size;
                    }
                    _ => counts.others += 1,
                }
                top(&mut stack)?.push(node);
            }
            Item::File(mut node, rx) => match rx.recv() {
                Ok(Ok(read)) => {
                    node.content = read.content;
                    node.size = read.size;
                    let _ = read.changed;
                    counts.files += 1;
                    counts.bytes += node.size;
                    top(&mut stack)?.push(node);
                }
                Ok(Err(msg)) => shared.report(msg),
                Err(_) => return Err(Error::Interrupted("a reader stopped".into())),
            },
        }
    }
    if shared.aborted() {
        return Err(Error::Interrupted("the backup stopped".into()));
    }
    if stack.len() != 1 {
        return Err(Error::Interrupted("the walk ended early".into()));
    }
    let (_, root) = stack
        .pop()
        .ok_or_else(|| Error::Interrupted("walker sent an unbalanced tree".into()))?;
    let id = store_tree(root)?;
    Ok((id, counts))
}

fn top(stack: &mut [(Option<Node>, Vec<Node>)]) -> Result<&mut Vec<Node>> {
    stack
        .last_mut()
        .map(|(_, v)| v)
        .ok_or_else(|| Error::Interrupted("walker sent an unbalanced tree".into()))
}

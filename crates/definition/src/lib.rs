//! The build graph: ops named by the sha256 of their deterministic protobuf
//! encoding, a builder the frontend uses to emit them, and a validated,
//! topologically ordered graph the solver consumes.
#![forbid(unsafe_code)]

pub mod image;
pub mod text;
pub mod time;

use std::collections::{BTreeMap, HashMap};

pub use kiln_digest::Digest;
pub use kiln_proto::definition as pb;
use prost::Message;

#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error("definition has no ops")]
    Empty,
    #[error("op {index} does not decode: {source}")]
    Decode {
        index: usize,
        source: prost::DecodeError,
    },
    #[error("op {op} references missing input {input}")]
    MissingInput { op: Digest, input: String },
    #[error("the build graph has a cycle through {0}")]
    Cycle(Digest),
    #[error("op {0} has no operation")]
    NoOp(Digest),
}

/// The file name a downloaded URL gets (its last path segment), shared by the
/// frontend (which copies it) and the worker (which downloads it).
pub fn url_filename(url: &str) -> String {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let path = path.split_once("://").map(|x| x.1).unwrap_or(path);
    let last = path
        .split_once('/')
        .map(|x| x.1)
        .unwrap_or("")
        .rsplit('/')
        .next()
        .unwrap_or("");
    if last.is_empty() || last == "." || last == ".." {
        "index.html".to_string()
    } else {
        last.to_string()
    }
}

/// A reference to one output of a vertex.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OutputRef {
    pub digest: Digest,
    pub index: i64,
}

/// One op of the graph.
#[derive(Debug, Clone)]
pub struct Vertex {
    pub digest: Digest,
    pub op: pb::Op,
    pub meta: pb::OpMetadata,
}

impl Vertex {
    pub fn name(&self) -> &str {
        if self.meta.description.is_empty() {
            self.digest.as_str()
        } else {
            &self.meta.description
        }
    }

    pub fn inputs(&self) -> impl Iterator<Item = Digest> + '_ {
        self.op.inputs.iter().filter_map(|i| i.digest.parse().ok())
    }
}

/// Emits ops in dependency order; identical ops are stored once.
#[derive(Default)]
pub struct GraphBuilder {
    ops: Vec<(Digest, Vec<u8>)>,
    meta: BTreeMap<Digest, pb::OpMetadata>,
    /// Bytes of the encoded ops so far.
    encoded: usize,
}

impl GraphBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes of the ops added so far, encoded.
    pub fn encoded_len(&self) -> usize {
        self.encoded
    }

    /// Adds an op; its inputs must already be in the builder.
    pub fn add(&mut self, op: &pb::Op, description: &str, location: &str) -> OutputRef {
        let bytes = op.encode_to_vec();
        let digest = Digest::of(&bytes);
        if !self.meta.contains_key(&digest) {
            self.encoded += bytes.len();
            self.ops.push((digest.clone(), bytes));
            self.meta.insert(
                digest.clone(),
                pb::OpMetadata {
                    digest: digest.to_string(),
                    description: description.to_string(),
                    location: location.to_string(),
                    ..Default::default()
                },
            );
        }
        OutputRef { digest, index: 0 }
    }

    /// Renames an op already added (its name is display only: not in its digest).
    pub fn set_description(&mut self, digest: &Digest, description: &str) {
        if let Some(m) = self.meta.get_mut(digest) {
            m.description = description.to_string();
        }
    }

    pub fn set_ignore_cache(&mut self, digest: &Digest) {
        if let Some(m) = self.meta.get_mut(digest) {
            m.ignore_cache = true;
        }
    }

    /// The definition whose output is `output` (only ops it depends on).
    pub fn finish(&self, output: &OutputRef) -> pb::Definition {
        let index: HashMap<&Digest, usize> = self
            .ops
            .iter()
            .enumerate()
            .map(|(i, (d, _))| (d, i))
            .collect();
        let mut keep = vec![false; self.ops.len()];
        let mut stack = vec![output.digest.clone()];
        while let Some(d) = stack.pop() {
            let Some(&i) = index.get(&d) else { continue };
            if keep[i] {
                continue;
            }
            keep[i] = true;
            if let Ok(op) = pb::Op::decode(self.ops[i].1.as_slice()) {
                stack.extend(op.inputs.iter().filter_map(|x| x.digest.parse().ok()));
            }
        }
        let mut def = pb::Definition::default();
        for (i, (d, bytes)) in self.ops.iter().enumerate() {
            if keep[i] {
                def.ops.push(bytes.clone());
                if let Some(m) = self.meta.get(d) {
                    def.metadata.push(m.clone());
                }
            }
        }
        // The output op goes last so a definition names its own result.
        if let Some(&i) = index.get(&output.digest) {
            let pos = def.ops.iter().position(|b| *b == self.ops[i].1);
            if let Some(pos) = pos {
                let b = def.ops.remove(pos);
                def.ops.push(b);
            }
        }
        def
    }
}

/// A validated graph in topological order (inputs before users).
#[derive(Debug, Clone)]
pub struct Graph {
    pub vertices: BTreeMap<Digest, Vertex>,
    pub order: Vec<Digest>,
    pub output: Digest,
}

impl Graph {
    pub fn from_definition(def: &pb::Definition) -> Result<Self, GraphError> {
        let mut vertices = BTreeMap::new();
        let mut last = None;
        let meta: HashMap<&str, &pb::OpMetadata> = def
            .metadata
            .iter()
            .map(|m| (m.digest.as_str(), m))
            .collect();
        for (index, bytes) in def.ops.iter().enumerate() {
            let op = pb::Op::decode(bytes.as_slice())
                .map_err(|source| GraphError::Decode { index, source })?;
            let digest = Digest::of(bytes);
            if op.op.is_none() {
                return Err(GraphError::NoOp(digest));
            }
            let m = meta
                .get(digest.as_str())
                .map(|m| (*m).clone())
                .unwrap_or_default();
            last = Some(digest.clone());
            vertices.insert(
                digest.clone(),
                Vertex {
                    digest,
                    op,
                    meta: m,
                },
            );
        }
        let output = last.ok_or(GraphError::Empty)?;
        let mut g = petgraph::graphmap::DiGraphMap::<usize, ()>::new();
        let ids: Vec<&Digest> = vertices.keys().collect();
        let pos: HashMap<&Digest, usize> = ids.iter().enumerate().map(|(i, d)| (*d, i)).collect();
        for (d, v) in &vertices {
            g.add_node(pos[d]);
            for input in &v.op.inputs {
                let id: Option<Digest> = input.digest.parse().ok();
                let Some(&p) = id.as_ref().and_then(|id| pos.get(id)) else {
                    return Err(GraphError::MissingInput {
                        op: d.clone(),
                        input: input.digest.clone(),
                    });
                };
                g.add_edge(p, pos[d], ());
            }
        }
        let order = petgraph::algo::toposort(&g, None)
            .map_err(|c| GraphError::Cycle(ids[c.node_id()].clone()))?
            .into_iter()
            .map(|i| ids[i].clone())
            .collect();
        Ok(Graph {
            vertices,
            order,
            output,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(id: &str) -> pb::Op {
        pb::Op {
            op: Some(pb::op::Op::Source(pb::SourceOp {
                identifier: id.into(),
                attrs: vec![],
            })),
            ..Default::default()
        }
    }

    #[test]
    fn digest_is_stable_and_dedupes() {
        let mut b = GraphBuilder::new();
        let a = b.add(&source("local://context"), "ctx", "");
        let a2 = b.add(&source("local://context"), "ctx again", "");
        assert_eq!(a, a2);
        let file = pb::Op {
            inputs: vec![pb::Input {
                digest: a.digest.to_string(),
                index: 0,
            }],
            op: Some(pb::op::Op::File(pb::FileOp {
                base: -1,
                actions: vec![],
            })),
            ..Default::default()
        };
        let f = b.add(&file, "copy", "Dockerfile:2");
        let def = b.finish(&f);
        let g = Graph::from_definition(&def).unwrap();
        assert_eq!(g.output, f.digest);
        assert_eq!(g.order, vec![a.digest.clone(), f.digest.clone()]);
        // Same op, same digest, on every run.
        assert_eq!(
            a.digest,
            Digest::of(&source("local://context").encode_to_vec())
        );
    }

    #[test]
    fn missing_input_is_an_error() {
        let op = pb::Op {
            inputs: vec![pb::Input {
                digest: Digest::of(b"nope").to_string(),
                index: 0,
            }],
            op: Some(pb::op::Op::Merge(pb::MergeOp { inputs: vec![0] })),
            ..Default::default()
        };
        let def = pb::Definition {
            ops: vec![op.encode_to_vec()],
            metadata: vec![],
        };
        assert!(matches!(
            Graph::from_definition(&def),
            Err(GraphError::MissingInput { .. })
        ));
    }
}

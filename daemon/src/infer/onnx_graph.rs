//! Just enough of the ONNX protobuf to cut a model into stage models.
//!
//! Works on the wire format directly: every field it does not need to edit is
//! kept as raw bytes and written back unchanged, so nothing in the model
//! (opsets, metadata, attributes, external data references) is lost.

/// A protobuf field kept verbatim (tag and value bytes).
#[derive(Debug, Clone)]
struct RawField(Vec<u8>);

/// A graph node: its raw bytes plus the fields the cutter reads.
#[derive(Debug, Clone)]
pub struct Node {
    raw: Vec<u8>,
    pub name: String,
    pub op_type: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
}

/// A named entry (initializer or value info) kept verbatim.
#[derive(Debug, Clone)]
pub struct Named {
    raw: Vec<u8>,
    pub name: String,
}

/// A decoded ONNX model.
#[derive(Debug, Clone)]
pub struct OnnxModel {
    model_fields: Vec<RawField>,
    graph_fields: Vec<RawField>,
    pub nodes: Vec<Node>,
    pub initializers: Vec<Named>,
    pub inputs: Vec<Named>,
    pub outputs: Vec<Named>,
    pub value_info: Vec<Named>,
}

/// The model bytes are not a valid ONNX protobuf.
#[derive(Debug, thiserror::Error)]
#[error("malformed ONNX protobuf: {0}")]
pub struct DecodeError(&'static str);

pub(super) const WT_VARINT: u8 = 0;
pub(super) const WT_I64: u8 = 1;
pub(super) const WT_LEN: u8 = 2;
pub(super) const WT_I32: u8 = 5;

// ModelProto
const MODEL_GRAPH: u32 = 7;
const MODEL_METADATA: u32 = 14;
// StringStringEntryProto
const ENTRY_KEY: u32 = 1;
const ENTRY_VALUE: u32 = 2;
// GraphProto
const GRAPH_NODE: u32 = 1;
const GRAPH_INITIALIZER: u32 = 5;
const GRAPH_INPUT: u32 = 11;
const GRAPH_OUTPUT: u32 = 12;
const GRAPH_VALUE_INFO: u32 = 13;
// NodeProto
const NODE_INPUT: u32 = 1;
const NODE_OUTPUT: u32 = 2;
const NODE_NAME: u32 = 3;
const NODE_OP_TYPE: u32 = 4;
// TensorProto
const TENSOR_NAME: u32 = 8;
// ValueInfoProto
const VI_NAME: u32 = 1;

/// One field read from a message: number, wire type, value bytes, whole field bytes.
pub(super) struct Field<'a> {
    pub(super) number: u32,
    pub(super) wire: u8,
    pub(super) value: &'a [u8],
    whole: &'a [u8],
}

pub(super) fn read_varint(buf: &[u8], pos: &mut usize) -> Result<u64, DecodeError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos).ok_or(DecodeError("truncated varint"))?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(DecodeError("varint too long"))
}

pub(super) fn fields(buf: &[u8]) -> impl Iterator<Item = Result<Field<'_>, DecodeError>> {
    let mut pos = 0;
    std::iter::from_fn(move || {
        if pos >= buf.len() {
            return None;
        }
        let start = pos;
        let res = (|| {
            let tag = read_varint(buf, &mut pos)?;
            let wire = (tag & 7) as u8;
            let number = u32::try_from(tag >> 3).map_err(|_| DecodeError("field number too large"))?;
            let vstart;
            match wire {
                WT_VARINT => {
                    vstart = pos;
                    read_varint(buf, &mut pos)?;
                }
                WT_I64 | WT_I32 => {
                    vstart = pos;
                    pos += if wire == WT_I64 { 8 } else { 4 };
                }
                WT_LEN => {
                    let len =
                        usize::try_from(read_varint(buf, &mut pos)?).map_err(|_| DecodeError("length too large"))?;
                    vstart = pos;
                    pos = pos.checked_add(len).ok_or(DecodeError("length overflow"))?;
                }
                _ => return Err(DecodeError("unsupported wire type")),
            }
            if pos > buf.len() {
                return Err(DecodeError("truncated field"));
            }
            Ok(Field { number, wire, value: &buf[vstart..pos], whole: &buf[start..pos] })
        })();
        if res.is_err() {
            pos = buf.len();
        }
        Some(res)
    })
}

pub(super) fn string(f: &Field<'_>) -> Result<String, DecodeError> {
    if f.wire != WT_LEN {
        return Err(DecodeError("expected a string field"));
    }
    String::from_utf8(f.value.to_vec()).map_err(|_| DecodeError("string is not UTF-8"))
}

fn name_of(msg: &[u8], field: u32) -> Result<String, DecodeError> {
    for f in fields(msg) {
        let f = f?;
        if f.number == field && f.wire == WT_LEN {
            return string(&f);
        }
    }
    Ok(String::new())
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_len(out: &mut Vec<u8>, number: u32, bytes: &[u8]) {
    put_varint(out, (u64::from(number) << 3) | u64::from(WT_LEN));
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

impl Node {
    /// The node's `NodeProto` bytes (attributes included).
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }
}

impl Named {
    /// The entry's protobuf bytes (a `TensorProto` for initializers).
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }
}

impl OnnxModel {
    /// Decodes a serialized `ModelProto`.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut model = Self {
            model_fields: Vec::new(),
            graph_fields: Vec::new(),
            nodes: Vec::new(),
            initializers: Vec::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            value_info: Vec::new(),
        };
        let mut graph = None;
        for f in fields(bytes) {
            let f = f?;
            if f.number == MODEL_GRAPH && f.wire == WT_LEN {
                graph = Some(f.value);
            } else {
                model.model_fields.push(RawField(f.whole.to_vec()));
            }
        }
        let graph = graph.ok_or(DecodeError("model has no graph"))?;
        for f in fields(graph) {
            let f = f?;
            let named = |field| -> Result<Named, DecodeError> {
                Ok(Named { raw: f.value.to_vec(), name: name_of(f.value, field)? })
            };
            match (f.number, f.wire) {
                (GRAPH_NODE, WT_LEN) => model.nodes.push(decode_node(f.value)?),
                (GRAPH_INITIALIZER, WT_LEN) => model.initializers.push(named(TENSOR_NAME)?),
                (GRAPH_INPUT, WT_LEN) => model.inputs.push(named(VI_NAME)?),
                (GRAPH_OUTPUT, WT_LEN) => model.outputs.push(named(VI_NAME)?),
                (GRAPH_VALUE_INFO, WT_LEN) => model.value_info.push(named(VI_NAME)?),
                _ => model.graph_fields.push(RawField(f.whole.to_vec())),
            }
        }
        if model.nodes.is_empty() {
            return Err(DecodeError("graph has no nodes"));
        }
        Ok(model)
    }

    /// The value of the model's `metadata_props` entry `key`, if it has one.
    pub fn metadata(&self, key: &str) -> Option<String> {
        self.model_fields.iter().find_map(|f| {
            let field = fields(&f.0).next()?.ok()?;
            if field.number != MODEL_METADATA || field.wire != WT_LEN {
                return None;
            }
            (name_of(field.value, ENTRY_KEY).ok()? == key).then(|| name_of(field.value, ENTRY_VALUE).ok())?
        })
    }

    /// Graph inputs that are not initializers (the model's real inputs).
    pub fn real_inputs(&self) -> Vec<&str> {
        let inits: std::collections::HashSet<&str> = self.initializers.iter().map(|i| i.name.as_str()).collect();
        self.inputs.iter().map(|i| i.name.as_str()).filter(|n| !inits.contains(n)).collect()
    }

    /// Serializes a model with the given nodes (indices into `self.nodes`), graph
    /// inputs and outputs (tensor names); initializers and value infos are kept
    /// where a selected node uses them.
    pub fn encode_subgraph(&self, node_ids: &[usize], inputs: &[&str], outputs: &[&str]) -> Vec<u8> {
        let used: std::collections::HashSet<&str> = node_ids
            .iter()
            .flat_map(|&i| self.nodes[i].inputs.iter().chain(&self.nodes[i].outputs))
            .map(String::as_str)
            .collect();
        let mut g = Vec::new();
        for f in &self.graph_fields {
            g.extend_from_slice(&f.0);
        }
        for &i in node_ids {
            put_len(&mut g, GRAPH_NODE, &self.nodes[i].raw);
        }
        for init in self.initializers.iter().filter(|i| used.contains(i.name.as_str())) {
            put_len(&mut g, GRAPH_INITIALIZER, &init.raw);
        }
        for name in inputs {
            put_len(&mut g, GRAPH_INPUT, &self.value_info_for(name));
        }
        for name in outputs {
            put_len(&mut g, GRAPH_OUTPUT, &self.value_info_for(name));
        }
        for vi in self.value_info.iter().filter(|v| used.contains(v.name.as_str())) {
            put_len(&mut g, GRAPH_VALUE_INFO, &vi.raw);
        }
        let mut out = Vec::with_capacity(g.len() + 64);
        for f in &self.model_fields {
            out.extend_from_slice(&f.0);
        }
        put_len(&mut out, MODEL_GRAPH, &g);
        out
    }

    /// The recorded `ValueInfoProto` of a tensor, or a synthesized float tensor of unknown shape.
    fn value_info_for(&self, name: &str) -> Vec<u8> {
        let known = self.inputs.iter().chain(&self.outputs).chain(&self.value_info).find(|v| v.name == name);
        if let Some(v) = known {
            return v.raw.clone();
        }
        // TypeProto { tensor_type (1): Tensor { elem_type (1): FLOAT = 1 } }
        let mut tensor = Vec::new();
        put_varint(&mut tensor, 1 << 3);
        put_varint(&mut tensor, 1);
        let mut ty = Vec::new();
        put_len(&mut ty, 1, &tensor);
        let mut vi = Vec::new();
        put_len(&mut vi, VI_NAME, name.as_bytes());
        put_len(&mut vi, 2, &ty);
        vi
    }
}

fn decode_node(raw: &[u8]) -> Result<Node, DecodeError> {
    let mut node = Node {
        raw: raw.to_vec(),
        name: String::new(),
        op_type: String::new(),
        inputs: Vec::new(),
        outputs: Vec::new(),
    };
    for f in fields(raw) {
        let f = f?;
        match f.number {
            NODE_INPUT => node.inputs.push(string(&f)?),
            NODE_OUTPUT => node.outputs.push(string(&f)?),
            NODE_NAME => node.name = string(&f)?,
            NODE_OP_TYPE => node.op_type = string(&f)?,
            _ => {}
        }
    }
    Ok(node)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bytes in [&b""[..], b"\xff\xff\xff", b"\x3a\x10abc", b"hello world this is not onnx"] {
            assert!(OnnxModel::decode(bytes).is_err());
        }
    }

    #[test]
    fn varint_roundtrip() {
        for v in [0u64, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            let mut pos = 0;
            assert_eq!(read_varint(&b, &mut pos).unwrap(), v);
            assert_eq!(pos, b.len());
        }
    }
}

//! The typed view of an ONNX graph the GPU lowering reads: each node's op,
//! tensors and attributes, and the initializers as f32 / i64 tensors.

use std::collections::HashMap;

use super::super::onnx_graph::{fields, read_varint, string, Field, OnnxModel, WT_I32, WT_LEN, WT_VARINT};
use super::GpuError;

/// An initializer or constant.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub dims: Vec<usize>,
    pub data: TensorData,
}

/// Tensor values, by element type.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

impl Tensor {
    /// A float tensor.
    pub fn f32(dims: Vec<usize>, data: Vec<f32>) -> Self {
        Self { dims, data: TensorData::F32(data) }
    }

    /// The float values, or `None` for another element type.
    pub fn floats(&self) -> Option<&[f32]> {
        match &self.data {
            TensorData::F32(v) => Some(v),
            TensorData::I64(_) => None,
        }
    }

    /// The values as i64 (floats truncated).
    pub fn ints(&self) -> Vec<i64> {
        match &self.data {
            TensorData::F32(v) => v.iter().map(|&x| x as i64).collect(),
            TensorData::I64(v) => v.clone(),
        }
    }
}

/// A node attribute.
#[derive(Debug, Clone, PartialEq)]
pub enum Attr {
    Int(i64),
    Float(f32),
    Ints(Vec<i64>),
    Floats(Vec<f32>),
    Str(String),
    Tensor(Tensor),
}

/// A node with decoded attributes.
#[derive(Debug, Clone, PartialEq)]
pub struct OpNode {
    pub name: String,
    pub op: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub attrs: HashMap<String, Attr>,
}

impl OpNode {
    /// An integer attribute or `default`.
    pub fn int(&self, key: &str, default: i64) -> i64 {
        match self.attrs.get(key) {
            Some(Attr::Int(v)) => *v,
            _ => default,
        }
    }

    /// A float attribute or `default`.
    pub fn float(&self, key: &str, default: f32) -> f32 {
        match self.attrs.get(key) {
            Some(Attr::Float(v)) => *v,
            _ => default,
        }
    }

    /// An integer-list attribute, or `None`.
    pub fn ints(&self, key: &str) -> Option<&[i64]> {
        match self.attrs.get(key) {
            Some(Attr::Ints(v)) => Some(v),
            _ => None,
        }
    }
}

/// The graph: nodes in topological order, initializers by name.
#[derive(Debug, Clone, Default)]
pub struct Graph {
    pub nodes: Vec<OpNode>,
    pub weights: HashMap<String, Tensor>,
    /// The real input (not an initializer).
    pub input: String,
    pub outputs: Vec<String>,
}

// NodeProto / AttributeProto / TensorProto field numbers.
const NODE_ATTRIBUTE: u32 = 5;
const ATTR_NAME: u32 = 1;
const ATTR_F: u32 = 2;
const ATTR_I: u32 = 3;
const ATTR_S: u32 = 4;
const ATTR_T: u32 = 5;
const ATTR_FLOATS: u32 = 7;
const ATTR_INTS: u32 = 8;
const T_DIMS: u32 = 1;
const T_DATA_TYPE: u32 = 2;
const T_FLOAT_DATA: u32 = 4;
const T_INT32_DATA: u32 = 5;
const T_INT64_DATA: u32 = 7;
const T_RAW_DATA: u32 = 9;
const T_DATA_LOCATION: u32 = 14;
const DT_FLOAT: u64 = 1;
const DT_INT32: u64 = 6;
const DT_INT64: u64 = 7;

fn bad(what: &str) -> GpuError {
    GpuError::Graph(format!("malformed ONNX for the GPU lowering: {what}"))
}

fn varint_of(f: &Field<'_>) -> Result<u64, GpuError> {
    let mut pos = 0;
    read_varint(f.value, &mut pos).map_err(|e| bad(&e.to_string()))
}

/// Values of a repeated varint field (packed or not) appended to `out`.
fn varints(f: &Field<'_>, out: &mut Vec<i64>) -> Result<(), GpuError> {
    match f.wire {
        WT_VARINT => out.push(varint_of(f)? as i64),
        WT_LEN => {
            let mut pos = 0;
            while pos < f.value.len() {
                out.push(read_varint(f.value, &mut pos).map_err(|e| bad(&e.to_string()))? as i64);
            }
        }
        _ => return Err(bad("integer field of an unexpected wire type")),
    }
    Ok(())
}

/// Values of a repeated float field (packed or not).
fn floats_of(f: &Field<'_>, out: &mut Vec<f32>) -> Result<(), GpuError> {
    let bytes = match f.wire {
        WT_I32 | WT_LEN => f.value,
        _ => return Err(bad("float field of an unexpected wire type")),
    };
    if bytes.len() % 4 != 0 {
        return Err(bad("float data not a multiple of 4 bytes"));
    }
    out.extend(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
    Ok(())
}

/// Decodes a `TensorProto` (float, int32 or int64; inline data only).
pub fn decode_tensor(raw: &[u8]) -> Result<Tensor, GpuError> {
    let (mut dims, mut dtype, mut floats, mut ints, mut raw_data): (Vec<i64>, _, Vec<f32>, Vec<i64>, _) =
        (Vec::new(), DT_FLOAT, Vec::new(), Vec::new(), None);
    for f in fields(raw) {
        let f = f.map_err(|e| bad(&e.to_string()))?;
        match f.number {
            T_DIMS => varints(&f, &mut dims)?,
            T_DATA_TYPE => dtype = varint_of(&f)?,
            T_FLOAT_DATA => floats_of(&f, &mut floats)?,
            T_INT32_DATA | T_INT64_DATA => varints(&f, &mut ints)?,
            T_RAW_DATA if f.wire == WT_LEN => raw_data = Some(f.value),
            T_DATA_LOCATION if varint_of(&f)? == 1 => return Err(bad("external tensor data is not supported")),
            _ => {}
        }
    }
    let dims: Vec<usize> = dims.iter().map(|&d| d.max(0) as usize).collect();
    let n: usize = dims.iter().product();
    let data = match (dtype, raw_data) {
        (DT_FLOAT, Some(b)) if b.len() % 4 == 0 => {
            TensorData::F32(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
        }
        (DT_FLOAT, None) => TensorData::F32(floats),
        (DT_INT64, Some(b)) if b.len() % 8 == 0 => {
            TensorData::I64(b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect())
        }
        (DT_INT32, Some(b)) if b.len() % 4 == 0 => TensorData::I64(
            b.chunks_exact(4).map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect(),
        ),
        (DT_INT64 | DT_INT32, None) => TensorData::I64(ints),
        (t, _) => return Err(GpuError::Graph(format!("tensor element type {t} is not supported on the GPU"))),
    };
    let len = match &data {
        TensorData::F32(v) => v.len(),
        TensorData::I64(v) => v.len(),
    };
    if len != n {
        return Err(bad(&format!("tensor of dims {dims:?} holds {len} values")));
    }
    Ok(Tensor { dims, data })
}

fn decode_attr(raw: &[u8]) -> Result<(String, Attr), GpuError> {
    let (mut name, mut attr) = (String::new(), None);
    let (mut ints, mut floats) = (Vec::new(), Vec::new());
    for f in fields(raw) {
        let f = f.map_err(|e| bad(&e.to_string()))?;
        match f.number {
            ATTR_NAME => name = string(&f).map_err(|e| bad(&e.to_string()))?,
            ATTR_F if f.wire == WT_I32 => {
                attr = Some(Attr::Float(f32::from_le_bytes(f.value.try_into().map_err(|_| bad("float attribute"))?)))
            }
            ATTR_I => attr = Some(Attr::Int(varint_of(&f)? as i64)),
            ATTR_S => attr = Some(Attr::Str(String::from_utf8_lossy(f.value).into_owned())),
            ATTR_T if f.wire == WT_LEN => attr = Some(Attr::Tensor(decode_tensor(f.value)?)),
            ATTR_FLOATS => floats_of(&f, &mut floats)?,
            ATTR_INTS => varints(&f, &mut ints)?,
            _ => {}
        }
    }
    let attr = match attr {
        Some(a) => a,
        None if !ints.is_empty() => Attr::Ints(ints),
        None if !floats.is_empty() => Attr::Floats(floats),
        // An empty list: an empty ints attribute is the useful reading (pads = []).
        None => Attr::Ints(Vec::new()),
    };
    Ok((name, attr))
}

impl Graph {
    /// The typed graph of a decoded model.
    pub fn from_onnx(model: &OnnxModel) -> Result<Self, GpuError> {
        let inputs = model.real_inputs();
        let [input] = inputs.as_slice() else {
            return Err(GpuError::Graph(format!(
                "the GPU executor serves one-input models, this one has {}",
                inputs.len()
            )));
        };
        let mut weights = HashMap::new();
        for init in &model.initializers {
            weights.insert(init.name.clone(), decode_tensor(init.raw())?);
        }
        let mut nodes = Vec::with_capacity(model.nodes.len());
        for n in &model.nodes {
            let mut attrs = HashMap::new();
            for f in fields(n.raw()) {
                let f = f.map_err(|e| bad(&e.to_string()))?;
                if f.number == NODE_ATTRIBUTE && f.wire == WT_LEN {
                    let (k, v) = decode_attr(f.value)?;
                    attrs.insert(k, v);
                }
            }
            nodes.push(OpNode {
                name: n.name.clone(),
                op: n.op_type.clone(),
                inputs: n.inputs.clone(),
                outputs: n.outputs.clone(),
                attrs,
            });
        }
        Ok(Self {
            nodes,
            weights,
            input: input.to_string(),
            outputs: model.outputs.iter().map(|o| o.name.clone()).collect(),
        })
    }
}

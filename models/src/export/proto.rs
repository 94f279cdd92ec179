//! The few ONNX protobuf messages an export needs, encoded and decoded by hand.
//!
//! ONNX files are protobuf `ModelProto` messages (onnx/onnx.proto, proto2
//! syntax). Exports use a small subset: a graph of nodes with integer
//! attributes, initializers as `raw_data` (little-endian), typed inputs and
//! outputs, opset imports and `metadata_props`. Writing them takes a
//! varint/length-delimited encoder of ~100 lines, which keeps `fleet-models`
//! free of any protobuf or inference runtime dependency.
//!
//! The decoder reads the same subset back (for `inspect` and for tests); it
//! skips fields it does not know and returns [`ExportError::Malformed`] on
//! truncated or inconsistent bytes, never panics.

use super::ExportError;

/// ONNX `TensorProto.DataType` values used by exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    /// 32-bit float.
    Float = 1,
    /// Unsigned 8-bit integer.
    Uint8 = 2,
    /// Signed 8-bit integer.
    Int8 = 3,
    /// Signed 32-bit integer.
    Int32 = 6,
    /// Signed 64-bit integer.
    Int64 = 7,
}

impl DataType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DataType::Float | DataType::Int32 => 4,
            DataType::Uint8 | DataType::Int8 => 1,
            DataType::Int64 => 8,
        }
    }

    /// The ONNX name (`float`, `uint8`, …), or `type <n>` for others.
    pub fn name_of(code: i64) -> String {
        match code {
            1 => "float".into(),
            2 => "uint8".into(),
            3 => "int8".into(),
            6 => "int32".into(),
            7 => "int64".into(),
            other => format!("type {other}"),
        }
    }
}

/// A constant tensor (ONNX initializer).
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Name referenced by node inputs.
    pub name: String,
    /// Dimensions.
    pub dims: Vec<i64>,
    /// Element type.
    pub data_type: DataType,
    /// Little-endian element bytes.
    pub raw: Vec<u8>,
}

impl Tensor {
    /// A float tensor.
    pub fn f32(name: &str, dims: &[usize], values: &[f32]) -> Self {
        Self::new(
            name,
            dims,
            DataType::Float,
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        )
    }

    /// An int8 tensor.
    pub fn i8(name: &str, dims: &[usize], values: &[i8]) -> Self {
        Self::new(
            name,
            dims,
            DataType::Int8,
            values.iter().map(|&v| v as u8).collect(),
        )
    }

    /// A uint8 tensor.
    pub fn u8(name: &str, dims: &[usize], values: &[u8]) -> Self {
        Self::new(name, dims, DataType::Uint8, values.to_vec())
    }

    /// An int32 tensor.
    pub fn i32(name: &str, dims: &[usize], values: &[i32]) -> Self {
        Self::new(
            name,
            dims,
            DataType::Int32,
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        )
    }

    /// An int64 tensor.
    pub fn i64(name: &str, dims: &[usize], values: &[i64]) -> Self {
        Self::new(
            name,
            dims,
            DataType::Int64,
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        )
    }

    fn new(name: &str, dims: &[usize], data_type: DataType, raw: Vec<u8>) -> Self {
        debug_assert_eq!(dims.iter().product::<usize>() * data_type.size(), raw.len());
        Self {
            name: name.into(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type,
            raw,
        }
    }
}

/// A node attribute.
#[derive(Debug, Clone, PartialEq)]
pub enum Attr {
    /// An integer.
    Int(&'static str, i64),
    /// A list of integers.
    Ints(&'static str, Vec<i64>),
}

/// One operator application.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// Operator name in the default domain (`Gemm`, `QLinearConv`, …).
    pub op_type: &'static str,
    /// Unique node name.
    pub name: String,
    /// Input value names (an empty string skips an optional input).
    pub inputs: Vec<String>,
    /// Output value names.
    pub outputs: Vec<String>,
    /// Attributes.
    pub attrs: Vec<Attr>,
}

/// A dimension of a graph input or output.
#[derive(Debug, Clone, PartialEq)]
pub enum Dim {
    /// A fixed size.
    Fixed(usize),
    /// A named free size (the batch).
    Symbol(&'static str),
}

/// A typed graph input or output.
#[derive(Debug, Clone, PartialEq)]
pub struct ValueInfo {
    /// Value name.
    pub name: String,
    /// Element type.
    pub data_type: DataType,
    /// Shape.
    pub dims: Vec<Dim>,
}

/// A complete model: one graph, its opset and string metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    /// Graph name.
    pub graph_name: String,
    /// Nodes in topological order.
    pub nodes: Vec<Node>,
    /// Constant tensors.
    pub initializers: Vec<Tensor>,
    /// Graph inputs.
    pub inputs: Vec<ValueInfo>,
    /// Graph outputs.
    pub outputs: Vec<ValueInfo>,
    /// `metadata_props` key/value pairs.
    pub metadata: Vec<(String, String)>,
    /// `model_version`.
    pub model_version: i64,
    /// Free text.
    pub doc_string: String,
}

/// ONNX IR version written (IR 7 goes with opset 13).
pub const IR_VERSION: i64 = 7;
/// Default-domain opset written: 13 has per-axis QuantizeLinear and every
/// operator exports use.
pub const OPSET: i64 = 13;
/// `producer_name` written.
pub const PRODUCER: &str = "fleet-models";

// ---------------------------------------------------------------- encoding

const VARINT: u64 = 0;
const FIXED32: u64 = 5;
const LEN: u64 = 2;

#[derive(Default)]
struct Enc(Vec<u8>);

impl Enc {
    fn raw_varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }
    fn key(&mut self, field: u64, wire: u64) {
        self.raw_varint(field << 3 | wire);
    }
    fn int(&mut self, field: u64, v: i64) {
        self.key(field, VARINT);
        self.raw_varint(v as u64);
    }
    fn bytes(&mut self, field: u64, b: &[u8]) {
        self.key(field, LEN);
        self.raw_varint(b.len() as u64);
        self.0.extend_from_slice(b);
    }
    fn str(&mut self, field: u64, s: &str) {
        self.bytes(field, s.as_bytes());
    }
    fn msg(&mut self, field: u64, f: impl FnOnce(&mut Enc)) {
        let mut inner = Enc::default();
        f(&mut inner);
        self.bytes(field, &inner.0);
    }
}

fn enc_tensor(e: &mut Enc, t: &Tensor) {
    for &d in &t.dims {
        e.int(1, d);
    }
    e.int(2, t.data_type as i64);
    e.str(8, &t.name);
    e.bytes(9, &t.raw);
}

fn enc_value_info(e: &mut Enc, v: &ValueInfo) {
    e.str(1, &v.name);
    e.msg(2, |ty| {
        ty.msg(1, |tt| {
            tt.int(1, v.data_type as i64);
            tt.msg(2, |shape| {
                for d in &v.dims {
                    shape.msg(1, |dim| match d {
                        Dim::Fixed(n) => dim.int(1, *n as i64),
                        Dim::Symbol(s) => dim.str(2, s),
                    });
                }
            });
        });
    });
}

fn enc_node(e: &mut Enc, n: &Node) {
    for i in &n.inputs {
        e.str(1, i);
    }
    for o in &n.outputs {
        e.str(2, o);
    }
    e.str(3, &n.name);
    e.str(4, n.op_type);
    for a in &n.attrs {
        e.msg(5, |attr| match a {
            Attr::Int(name, v) => {
                attr.str(1, name);
                attr.int(3, *v);
                attr.int(20, 2);
            }
            Attr::Ints(name, vs) => {
                attr.str(1, name);
                for v in vs {
                    attr.int(8, *v);
                }
                attr.int(20, 7);
            }
        });
    }
}

impl Model {
    /// Serialises the model as an ONNX `ModelProto`.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.int(1, IR_VERSION);
        e.str(2, PRODUCER);
        e.str(3, env!("CARGO_PKG_VERSION"));
        e.int(5, self.model_version);
        e.str(6, &self.doc_string);
        e.msg(7, |g| {
            for n in &self.nodes {
                g.msg(1, |m| enc_node(m, n));
            }
            g.str(2, &self.graph_name);
            for t in &self.initializers {
                g.msg(5, |m| enc_tensor(m, t));
            }
            for v in &self.inputs {
                g.msg(11, |m| enc_value_info(m, v));
            }
            for v in &self.outputs {
                g.msg(12, |m| enc_value_info(m, v));
            }
        });
        e.msg(8, |o| {
            o.str(1, "");
            o.int(2, OPSET);
        });
        for (k, v) in &self.metadata {
            e.msg(14, |m| {
                m.str(1, k);
                m.str(2, v);
            });
        }
        e.0
    }
}

// ---------------------------------------------------------------- decoding

/// A field value read from the wire.
#[derive(Debug, Clone, Copy)]
enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

struct Dec<'a> {
    buf: &'a [u8],
    at: usize,
    what: &'static str,
}

impl<'a> Dec<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, at: 0, what }
    }

    fn bad(&self, reason: &str) -> ExportError {
        ExportError::Malformed {
            reason: format!("{} at byte {}: {reason}", self.what, self.at),
        }
    }

    fn varint(&mut self) -> Result<u64, ExportError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let Some(&b) = self.buf.get(self.at) else {
                return Err(self.bad("truncated varint"));
            };
            self.at += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(self.bad("varint longer than 10 bytes"))
    }

    fn next(&mut self) -> Result<Option<(u64, Value<'a>)>, ExportError> {
        if self.at >= self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let (field, wire) = (key >> 3, key & 7);
        let value = match wire {
            VARINT => Value::Varint(self.varint()?),
            LEN => {
                let n = self.varint()?;
                let end = usize::try_from(n)
                    .ok()
                    .and_then(|n| self.at.checked_add(n))
                    .filter(|&end| end <= self.buf.len())
                    .ok_or_else(|| self.bad("length runs past the end (file truncated?)"))?;
                let b = &self.buf[self.at..end];
                self.at = end;
                Value::Bytes(b)
            }
            FIXED32 | 1 => {
                let n = if wire == FIXED32 { 4 } else { 8 };
                if self.at + n > self.buf.len() {
                    return Err(self.bad("truncated fixed-width value"));
                }
                self.at += n;
                Value::Fixed
            }
            other => return Err(self.bad(&format!("unsupported wire type {other}"))),
        };
        if field == 0 {
            return Err(self.bad("field number 0"));
        }
        Ok(Some((field, value)))
    }
}

fn text(v: Value<'_>, what: &str) -> Result<String, ExportError> {
    match v {
        Value::Bytes(b) => String::from_utf8(b.to_vec()).map_err(|_| ExportError::Malformed {
            reason: format!("{what} is not UTF-8"),
        }),
        _ => Err(ExportError::Malformed {
            reason: format!("{what} has the wrong wire type"),
        }),
    }
}

fn int(v: Value<'_>, what: &str) -> Result<i64, ExportError> {
    match v {
        Value::Varint(n) => Ok(n as i64),
        _ => Err(ExportError::Malformed {
            reason: format!("{what} has the wrong wire type"),
        }),
    }
}

fn sub<'a>(v: Value<'a>, what: &'static str) -> Result<Dec<'a>, ExportError> {
    match v {
        Value::Bytes(b) => Ok(Dec::new(b, what)),
        _ => Err(ExportError::Malformed {
            reason: format!("{what} has the wrong wire type"),
        }),
    }
}

/// A summary of one initializer, as read back from a file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TensorSummary {
    /// Name.
    pub name: String,
    /// Element type name.
    pub data_type: String,
    /// Dimensions.
    pub dims: Vec<i64>,
    /// Bytes of data.
    pub bytes: usize,
}

/// What [`decode`] reads from an ONNX file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Decoded {
    /// `ir_version`.
    pub ir_version: i64,
    /// `producer_name`.
    pub producer: String,
    /// Default-domain opset version (0 when absent).
    pub opset: i64,
    /// `model_version`.
    pub model_version: i64,
    /// Operator type of every node, in graph order.
    pub ops: Vec<String>,
    /// Initializers.
    pub initializers: Vec<TensorSummary>,
    /// Graph input names.
    pub inputs: Vec<String>,
    /// Graph output names.
    pub outputs: Vec<String>,
    /// `metadata_props`.
    pub metadata: Vec<(String, String)>,
}

/// Reads the structure and metadata of an ONNX file (any producer).
pub fn decode(bytes: &[u8]) -> Result<Decoded, ExportError> {
    let mut out = Decoded {
        ir_version: 0,
        producer: String::new(),
        opset: 0,
        model_version: 0,
        ops: vec![],
        initializers: vec![],
        inputs: vec![],
        outputs: vec![],
        metadata: vec![],
    };
    let mut graph_seen = false;
    let mut d = Dec::new(bytes, "ModelProto");
    while let Some((field, v)) = d.next()? {
        match field {
            1 => out.ir_version = int(v, "ir_version")?,
            2 => out.producer = text(v, "producer_name")?,
            5 => out.model_version = int(v, "model_version")?,
            7 => {
                graph_seen = true;
                decode_graph(sub(v, "GraphProto")?, &mut out)?;
            }
            8 => {
                let mut o = sub(v, "OperatorSetIdProto")?;
                let (mut domain, mut version) = (String::new(), 0);
                while let Some((f, v)) = o.next()? {
                    match f {
                        1 => domain = text(v, "opset domain")?,
                        2 => version = int(v, "opset version")?,
                        _ => {}
                    }
                }
                if domain.is_empty() || domain == "ai.onnx" {
                    out.opset = version;
                }
            }
            14 => {
                let mut m = sub(v, "StringStringEntryProto")?;
                let (mut k, mut val) = (String::new(), String::new());
                while let Some((f, v)) = m.next()? {
                    match f {
                        1 => k = text(v, "metadata key")?,
                        2 => val = text(v, "metadata value")?,
                        _ => {}
                    }
                }
                out.metadata.push((k, val));
            }
            _ => {}
        }
    }
    if !graph_seen {
        return Err(ExportError::Malformed {
            reason: "no graph in the ModelProto (not an ONNX model, or truncated)".into(),
        });
    }
    Ok(out)
}

fn decode_graph(mut g: Dec<'_>, out: &mut Decoded) -> Result<(), ExportError> {
    while let Some((field, v)) = g.next()? {
        match field {
            1 => {
                let mut n = sub(v, "NodeProto")?;
                let mut op = String::new();
                while let Some((f, v)) = n.next()? {
                    if f == 4 {
                        op = text(v, "op_type")?;
                    }
                }
                out.ops.push(op);
            }
            5 => {
                let mut t = sub(v, "TensorProto")?;
                let mut s = TensorSummary {
                    name: String::new(),
                    data_type: String::new(),
                    dims: vec![],
                    bytes: 0,
                };
                while let Some((f, v)) = t.next()? {
                    match (f, v) {
                        (1, Value::Varint(d)) => s.dims.push(d as i64),
                        (1, Value::Bytes(packed)) => {
                            let mut p = Dec::new(packed, "packed dims");
                            while p.at < packed.len() {
                                s.dims.push(p.varint()? as i64);
                            }
                        }
                        (2, v) => s.data_type = DataType::name_of(int(v, "data_type")?),
                        (8, v) => s.name = text(v, "tensor name")?,
                        (9, Value::Bytes(b)) => s.bytes = b.len(),
                        (4 | 5 | 7, Value::Bytes(b)) => s.bytes = b.len(),
                        _ => {}
                    }
                }
                out.initializers.push(s);
            }
            11 | 12 => {
                let mut vi = sub(v, "ValueInfoProto")?;
                let mut name = String::new();
                while let Some((f, v)) = vi.next()? {
                    if f == 1 {
                        name = text(v, "value name")?;
                    }
                }
                if field == 11 {
                    out.inputs.push(name);
                } else {
                    out.outputs.push(name);
                }
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Model {
        Model {
            graph_name: "g".into(),
            nodes: vec![Node {
                op_type: "MaxPool",
                name: "pool".into(),
                inputs: vec!["x".into()],
                outputs: vec!["y".into()],
                attrs: vec![
                    Attr::Ints("kernel_shape", vec![2, 2]),
                    Attr::Int("ceil_mode", 0),
                ],
            }],
            initializers: vec![
                Tensor::f32("w", &[2, 3], &[1.0; 6]),
                Tensor::i8("q", &[3], &[-1, 0, 1]),
            ],
            inputs: vec![ValueInfo {
                name: "x".into(),
                data_type: DataType::Float,
                dims: vec![Dim::Symbol("N"), Dim::Fixed(4)],
            }],
            outputs: vec![ValueInfo {
                name: "y".into(),
                data_type: DataType::Float,
                dims: vec![Dim::Symbol("N"), Dim::Fixed(4)],
            }],
            metadata: vec![("k".into(), "v é".into())],
            model_version: 300,
            doc_string: "d".into(),
        }
    }

    #[test]
    fn encode_then_decode_round_trips_the_summary() {
        let bytes = sample().encode();
        let d = decode(&bytes).unwrap();
        assert_eq!(d.ir_version, IR_VERSION);
        assert_eq!(d.opset, OPSET);
        assert_eq!(d.producer, PRODUCER);
        assert_eq!(d.model_version, 300);
        assert_eq!(d.ops, ["MaxPool"]);
        assert_eq!(d.inputs, ["x"]);
        assert_eq!(d.outputs, ["y"]);
        assert_eq!(d.metadata, [("k".to_string(), "v é".to_string())]);
        assert_eq!(d.initializers[0].dims, [2, 3]);
        assert_eq!(d.initializers[0].bytes, 24);
        assert_eq!(d.initializers[1].data_type, "int8");
    }

    #[test]
    fn varints_match_the_protobuf_examples() {
        // From the protobuf encoding guide: 150 is 96 01; field 1 varint key is 08.
        let mut e = Enc::default();
        e.int(1, 150);
        assert_eq!(e.0, [0x08, 0x96, 0x01]);
        // Negative int64 values take ten bytes.
        let mut e = Enc::default();
        e.raw_varint(-1i64 as u64);
        assert_eq!(e.0.len(), 10);
        assert_eq!(Dec::new(&e.0, "t").varint().unwrap(), u64::MAX);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let bytes = sample().encode();
        for cut in 0..bytes.len() {
            // A cut exactly between two top-level fields still parses (the
            // artifact's SHA-256 catches that case); it then lacks the last
            // field, the metadata.
            if let Ok(d) = decode(&bytes[..cut]) {
                assert!(d.metadata.is_empty(), "cut at {cut}");
            }
        }
        assert!(matches!(
            decode(b"not a model"),
            Err(ExportError::Malformed { .. })
        ));
        assert!(matches!(decode(&[]), Err(ExportError::Malformed { .. })));
    }
}

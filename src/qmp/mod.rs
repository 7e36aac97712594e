//! QMP, as QEMU's docs/interop/qmp-spec.rst defines it: greeting,
//! capabilities negotiation, commands with ids, errors, events.
//!
//! [`stream`] splits the byte stream, this module validates requests and
//! formats replies and events, [`server`] serves sockets from an io_uring
//! loop. Command semantics live with the controller that owns the VM.

pub mod client;
pub mod server;
pub mod stream;

use serde_json::{json, Map, Value};

/// QEMU's error classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
    DeviceNotActive,
    DeviceNotFound,
    KvmMissingCap,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KvmMissingCap => "KVMMissingCap",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    pub class: ErrorClass,
    pub desc: String,
}

impl QmpError {
    pub fn generic(desc: impl Into<String>) -> QmpError {
        QmpError { class: ErrorClass::GenericError, desc: desc.into() }
    }
    pub fn not_found(desc: impl Into<String>) -> QmpError {
        QmpError { class: ErrorClass::CommandNotFound, desc: desc.into() }
    }
}

/// The JSON type an argument must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgType {
    Str,
    Int,
    Bool,
    Number,
    Object,
    Array,
    Any,
}

impl ArgType {
    fn accepts(self, v: &Value) -> bool {
        match self {
            ArgType::Str => v.is_string(),
            ArgType::Int => v.is_i64() || v.is_u64(),
            ArgType::Bool => v.is_boolean(),
            ArgType::Number => v.is_number(),
            ArgType::Object => v.is_object(),
            ArgType::Array => v.is_array(),
            ArgType::Any => true,
        }
    }
    fn name(self) -> &'static str {
        match self {
            ArgType::Str => "string",
            ArgType::Int => "integer",
            ArgType::Bool => "boolean",
            ArgType::Number => "number",
            ArgType::Object => "object",
            ArgType::Array => "array",
            ArgType::Any => "any",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Arg {
    pub name: &'static str,
    pub ty: ArgType,
    pub required: bool,
}

pub const fn req(name: &'static str, ty: ArgType) -> Arg {
    Arg { name, ty, required: true }
}

pub const fn opt(name: &'static str, ty: ArgType) -> Arg {
    Arg { name, ty, required: false }
}

/// A command's name and arguments.
#[derive(Debug, Clone, Copy)]
pub struct CommandSpec {
    pub name: &'static str,
    pub args: &'static [Arg],
}

/// Checks `args` against `spec` the way QEMU's generated visitors do:
/// missing, unexpected and mistyped parameters are named.
pub fn check_args(args: &Map<String, Value>, spec: &[Arg]) -> Result<(), QmpError> {
    for a in spec {
        match args.get(a.name) {
            None if a.required => return Err(QmpError::generic(format!("Parameter '{}' is missing", a.name))),
            None => {}
            Some(v) if !a.ty.accepts(v) => return Err(QmpError::generic(format!("Invalid parameter type for '{}', expected: {}", a.name, a.ty.name()))),
            Some(_) => {}
        }
    }
    if let Some(k) = args.keys().find(|k| !spec.iter().any(|a| a.name == k.as_str())) {
        return Err(QmpError::generic(format!("Parameter '{k}' is unexpected")));
    }
    Ok(())
}

/// A validated request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub execute: String,
    pub arguments: Map<String, Value>,
    pub id: Option<Value>,
}

/// Parses one JSON text into a request. On error, the id (if one could be
/// read) comes back so the error reply can carry it.
pub fn parse_request(text: &[u8]) -> Result<Request, (QmpError, Option<Value>)> {
    let v: Value = serde_json::from_slice(text).map_err(|e| (QmpError::generic(format!("JSON parse error, {e}")), None))?;
    let Value::Object(mut obj) = v else {
        return Err((QmpError::generic("QMP input must be a JSON object"), None));
    };
    let id = obj.remove("id");
    let fail = |desc: String| Err((QmpError::generic(desc), id.clone()));
    if obj.contains_key("exec-oob") {
        return fail("QMP input member 'exec-oob' is unexpected: out-of-band execution was not negotiated".into());
    }
    let execute = match obj.remove("execute") {
        None => return fail("QMP input lacks member 'execute'".into()),
        Some(Value::String(s)) => s,
        Some(_) => return fail("QMP input member 'execute' must be a string".into()),
    };
    let arguments = match obj.remove("arguments") {
        None => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => return fail("QMP input member 'arguments' must be an object".into()),
    };
    if let Some(k) = obj.keys().next() {
        return fail(format!("QMP input member '{k}' is unexpected"));
    }
    Ok(Request { execute, arguments, id })
}

fn line(v: Value) -> Vec<u8> {
    let mut b = serde_json::to_vec(&v).unwrap_or_default();
    b.extend_from_slice(b"\r\n");
    b
}

pub fn reply_ok(ret: Value, id: Option<&Value>) -> Vec<u8> {
    let mut m = Map::new();
    m.insert("return".into(), ret);
    if let Some(id) = id {
        m.insert("id".into(), id.clone());
    }
    line(Value::Object(m))
}

pub fn reply_err(err: &QmpError, id: Option<&Value>) -> Vec<u8> {
    let mut m = Map::new();
    m.insert("error".into(), json!({"class": err.class.as_str(), "desc": err.desc}));
    if let Some(id) = id {
        m.insert("id".into(), id.clone());
    }
    line(Value::Object(m))
}

/// An event, stamped with the wall-clock time as QMP requires.
pub fn event(name: &str, data: Option<Value>) -> Vec<u8> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let mut m = Map::new();
    m.insert("event".into(), Value::String(name.into()));
    if let Some(d) = data {
        m.insert("data".into(), d);
    }
    m.insert("timestamp".into(), json!({"seconds": now.as_secs(), "microseconds": now.subsec_micros()}));
    line(Value::Object(m))
}

/// The QEMU release whose QMP dialect ringvm follows.
pub const QEMU_COMPAT: (u32, u32, u32) = (10, 0, 0);

pub fn version() -> Value {
    let (major, minor, micro) = QEMU_COMPAT;
    json!({"qemu": {"major": major, "minor": minor, "micro": micro}, "package": format!("ringvm {}", env!("CARGO_PKG_VERSION"))})
}

pub fn greeting() -> Vec<u8> {
    line(json!({"QMP": {"version": version(), "capabilities": []}}))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &[Arg] = &[req("uri", ArgType::Str), opt("detach", ArgType::Bool)];

    fn args(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn argument_checks_name_the_argument() {
        assert!(check_args(&args(json!({"uri": "file:/x"})), SPEC).is_ok());
        assert_eq!(check_args(&args(json!({})), SPEC).unwrap_err().desc, "Parameter 'uri' is missing");
        assert_eq!(check_args(&args(json!({"uri": 1})), SPEC).unwrap_err().desc, "Invalid parameter type for 'uri', expected: string");
        assert_eq!(check_args(&args(json!({"uri": "a", "x": 1})), SPEC).unwrap_err().desc, "Parameter 'x' is unexpected");
        assert_eq!(check_args(&args(json!({"uri": "a", "detach": "yes"})), SPEC).unwrap_err().desc, "Invalid parameter type for 'detach', expected: boolean");
    }

    #[test]
    fn requests_are_validated_and_ids_kept() {
        let r = parse_request(br#"{"execute":"stop","id":{"x":[1]}}"#).unwrap();
        assert_eq!((r.execute.as_str(), r.id), ("stop", Some(json!({"x":[1]}))));
        let bad = |t: &[u8]| parse_request(t).unwrap_err();
        assert!(bad(b"{").0.desc.starts_with("JSON parse error"));
        assert_eq!(bad(b"[1]").0.desc, "QMP input must be a JSON object");
        assert_eq!(bad(br#"{"id":7}"#), (QmpError::generic("QMP input lacks member 'execute'"), Some(json!(7))));
        assert_eq!(bad(br#"{"execute":1}"#).0.desc, "QMP input member 'execute' must be a string");
        assert_eq!(bad(br#"{"execute":"a","arguments":[]}"#).0.desc, "QMP input member 'arguments' must be an object");
        assert_eq!(bad(br#"{"execute":"a","foo":1}"#).0.desc, "QMP input member 'foo' is unexpected");
    }

    #[test]
    fn replies_and_events_are_single_lines() {
        let r = reply_err(&QmpError::not_found("The command x has not been found"), Some(&json!("a")));
        let v: Value = serde_json::from_slice(&r).unwrap();
        assert_eq!(v, json!({"error": {"class": "CommandNotFound", "desc": "The command x has not been found"}, "id": "a"}));
        assert!(r.ends_with(b"\r\n") && !r[..r.len() - 2].contains(&b'\n'));
        let e: Value = serde_json::from_slice(&event("STOP", None)).unwrap();
        assert_eq!(e["event"], "STOP");
        assert!(e["timestamp"]["seconds"].as_u64().unwrap() > 1_600_000_000);
        let g: Value = serde_json::from_slice(&greeting()).unwrap();
        assert_eq!(g["QMP"]["version"]["qemu"]["major"], 10);
        assert!(g["QMP"]["version"]["package"].as_str().unwrap().starts_with("ringvm "));
    }
}

//! Reading pass options (JSON) with precise errors.

use std::collections::HashMap;

use serde_json::Value;

use super::ir::Pos;
use super::RewriteError;

pub(crate) fn opt_err(expected: &str, found: &str) -> RewriteError {
    RewriteError::new("options", Pos::default(), expected, found)
}

pub(crate) fn parse_json(text: &str) -> Result<serde_json::Map<String, Value>, RewriteError> {
    let v: Value = serde_json::from_str(text).map_err(|e| {
        RewriteError::new(
            "options",
            Pos {
                line: e.line(),
                column: e.column(),
            },
            "a JSON object",
            &e.to_string(),
        )
    })?;
    match v {
        Value::Object(m) => Ok(m),
        other => Err(opt_err("a JSON object", &kind(&other))),
    }
}

pub(crate) fn kind(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("{b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

pub(crate) fn check_keys(
    m: &serde_json::Map<String, Value>,
    allowed: &[&str],
    what: &str,
) -> Result<(), RewriteError> {
    for k in m.keys() {
        if !allowed.contains(&k.as_str()) {
            return Err(opt_err(
                &format!("one of the keys {allowed:?} in {what}"),
                &format!("the key {k:?}"),
            ));
        }
    }
    Ok(())
}

pub(crate) fn as_index(v: &Value, what: &str) -> Result<usize, RewriteError> {
    v.as_u64()
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| opt_err(&format!("a non-negative integer for {what}"), &kind(v)))
}

pub(crate) fn as_scale(v: &Value, what: &str) -> Result<f32, RewriteError> {
    let x = v
        .as_f64()
        .ok_or_else(|| opt_err(&format!("a number for {what}"), &kind(v)))?;
    let f = x as f32;
    if !(f.is_finite() && f > 0.0) {
        return Err(opt_err(
            &format!("a finite scale > 0 (as f32) for {what}"),
            &kind(v),
        ));
    }
    Ok(f)
}

pub(crate) fn index_list(v: Option<&Value>, what: &str) -> Result<Vec<usize>, RewriteError> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(|i| as_index(i, what)).collect(),
        Some(other) => Err(opt_err(
            &format!("an array of indices for {what}"),
            &kind(other),
        )),
    }
}

pub(crate) fn entry_name(m: &serde_json::Map<String, Value>) -> Result<String, RewriteError> {
    match m.get("entry") {
        None | Some(Value::Null) => Ok("main".into()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(opt_err("a string for `entry`", &kind(other))),
    }
}

/// `args`: the sidecar's list of `{index, path, …}` (extra keys ignored) → index → path.
pub(crate) fn arg_paths(
    m: &serde_json::Map<String, Value>,
) -> Result<HashMap<usize, String>, RewriteError> {
    let mut out = HashMap::new();
    match m.get("args") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for it in items {
                let index = it
                    .get("index")
                    .ok_or_else(|| opt_err("`index` in each entry of `args`", &kind(it)))?;
                let index = as_index(index, "`args[].index`")?;
                if let Some(p) = it.get("path").and_then(Value::as_str) {
                    out.insert(index, p.to_string());
                }
            }
        }
        Some(other) => return Err(opt_err("an array for `args`", &kind(other))),
    }
    Ok(out)
}

//! Reading and writing the few attribute values the passes need (dimension numbers, function
//! types, i64 arrays, float literals). Everything else stays text.

use super::ir::{Pos, Type};
use super::parse::parse_type;
use super::RewriteError;

/// `dot_general` dimension numbers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DotDims {
    /// lhs batching dims.
    pub lhs_batching: Vec<i64>,
    /// rhs batching dims.
    pub rhs_batching: Vec<i64>,
    /// lhs contracting dims.
    pub lhs_contracting: Vec<i64>,
    /// rhs contracting dims.
    pub rhs_contracting: Vec<i64>,
}

/// Splits `text` at top-level commas (brackets and strings respected).
pub fn split_top(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut in_str = false;
    let mut escaped = false;
    let mut start = 0;
    let bytes = text.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if in_str {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_str = false;
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'(' | b'[' | b'{' | b'<' => depth += 1,
            b'>' if i > 0 && bytes[i - 1] == b'-' => {}
            b')' | b']' | b'}' | b'>' => depth -= 1,
            b',' if depth == 0 => {
                parts.push(text[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    let last = text[start..].trim();
    if !last.is_empty() || !parts.is_empty() {
        parts.push(last);
    }
    parts
}

/// Parses `[1, 2]` (or `[]`).
pub fn parse_list_i64(text: &str) -> Option<Vec<i64>> {
    let inner = text.trim().strip_prefix('[')?.strip_suffix(']')?;
    if inner.trim().is_empty() {
        return Some(Vec::new());
    }
    inner.split(',').map(|s| s.trim().parse().ok()).collect()
}

/// Parses `array<i64: 1, 0>` (or `array<i64>`).
pub fn parse_array_i64(text: &str) -> Option<Vec<i64>> {
    let inner = text.trim().strip_prefix("array<i64")?.strip_suffix('>')?;
    let inner = inner.trim();
    if inner.is_empty() {
        return Some(Vec::new());
    }
    let inner = inner.strip_prefix(':')?;
    inner.split(',').map(|s| s.trim().parse().ok()).collect()
}

/// Prints `array<i64: 1, 0>` (or `array<i64>`).
pub fn array_i64(values: &[i64]) -> String {
    if values.is_empty() {
        return "array<i64>".to_string();
    }
    let items: Vec<String> = values.iter().map(|v| v.to_string()).collect();
    format!("array<i64: {}>", items.join(", "))
}

/// Prints an f32 the way MLIR float attributes need it (always with a decimal point).
pub fn fmt_f32(x: f32) -> String {
    format!("{x:.9e}")
}

/// `key = [..]` fields of an attribute like `#stablehlo.dot<a = [1], b = [0]>` or
/// `#stablehlo.gather<offset_dims = [2], index_vector_dim = 2>`.
pub fn struct_fields<'t>(text: &'t str, prefix: &str) -> Option<Vec<(&'t str, &'t str)>> {
    let inner = text.trim().strip_prefix(prefix)?.strip_prefix('<')?;
    let inner = inner.strip_suffix('>')?;
    split_top(inner)
        .into_iter()
        .map(|field| {
            let (k, v) = field.split_once('=')?;
            Some((k.trim(), v.trim()))
        })
        .collect()
}

impl DotDims {
    /// Parses `#stablehlo.dot<lhs_batching_dimensions = [0], …>`.
    pub fn parse(text: &str) -> Option<DotDims> {
        let mut d = DotDims::default();
        for (k, v) in struct_fields(text, "#stablehlo.dot")? {
            let list = parse_list_i64(v)?;
            match k {
                "lhs_batching_dimensions" => d.lhs_batching = list,
                "rhs_batching_dimensions" => d.rhs_batching = list,
                "lhs_contracting_dimensions" => d.lhs_contracting = list,
                "rhs_contracting_dimensions" => d.rhs_contracting = list,
                _ => return None,
            }
        }
        if d.lhs_batching.len() != d.rhs_batching.len()
            || d.lhs_contracting.len() != d.rhs_contracting.len()
        {
            return None;
        }
        Some(d)
    }
}

/// Gather dimension numbers (the fields the embedding rewrite needs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GatherDims {
    /// Result dims that hold the slice dims not collapsed.
    pub offset_dims: Vec<i64>,
    /// Operand dims collapsed away.
    pub collapsed_slice_dims: Vec<i64>,
    /// Operand batching dims.
    pub operand_batching_dims: Vec<i64>,
    /// Start-indices batching dims.
    pub start_indices_batching_dims: Vec<i64>,
    /// Operand dim each index component addresses.
    pub start_index_map: Vec<i64>,
    /// Dim of the start indices that holds the index vector.
    pub index_vector_dim: Option<i64>,
}

impl GatherDims {
    /// Parses `#stablehlo.gather<offset_dims = [2], collapsed_slice_dims = [0], …>`.
    pub fn parse(text: &str) -> Option<GatherDims> {
        let mut d = GatherDims::default();
        for (k, v) in struct_fields(text, "#stablehlo.gather")? {
            match k {
                "offset_dims" => d.offset_dims = parse_list_i64(v)?,
                "collapsed_slice_dims" => d.collapsed_slice_dims = parse_list_i64(v)?,
                "operand_batching_dims" => d.operand_batching_dims = parse_list_i64(v)?,
                "start_indices_batching_dims" => d.start_indices_batching_dims = parse_list_i64(v)?,
                "start_index_map" => d.start_index_map = parse_list_i64(v)?,
                "index_vector_dim" => d.index_vector_dim = Some(v.trim().parse().ok()?),
                _ => {}
            }
        }
        Some(d)
    }
}

/// A function type `(T, T) -> T` / `-> (T, T)`.
#[derive(Clone, Debug, PartialEq)]
pub struct FunctionType {
    /// Inputs.
    pub inputs: Vec<Type>,
    /// Results.
    pub results: Vec<Type>,
}

impl FunctionType {
    /// Parses a function type attribute value.
    pub fn parse(text: &str, pos: Pos) -> Result<FunctionType, RewriteError> {
        let bad = |what: &str| {
            RewriteError::new(
                "parser",
                pos,
                "a function type `(types) -> types`",
                &format!("{what} in `{}`", shorten(text)),
            )
        };
        let text = text.trim();
        let rest = text.strip_prefix('(').ok_or_else(|| bad("no `(`"))?;
        // Find the `)` matching the opening one.
        let mut depth = 1i32;
        let mut close = None;
        let bytes = rest.as_bytes();
        for (i, &b) in bytes.iter().enumerate() {
            match b {
                b'(' | b'<' | b'[' | b'{' => depth += 1,
                b'>' if i > 0 && bytes[i - 1] == b'-' => {}
                b')' | b'>' | b']' | b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        close = Some(i);
                        break;
                    }
                }
                _ => {}
            }
        }
        let close = close.ok_or_else(|| bad("unbalanced brackets"))?;
        let inputs_text = &rest[..close];
        let after = rest[close + 1..]
            .trim()
            .strip_prefix("->")
            .ok_or_else(|| bad("no `->`"))?
            .trim();
        let parse_list = |s: &str| -> Result<Vec<Type>, RewriteError> {
            split_top(s)
                .into_iter()
                .map(|t| parse_type(t).map_err(|_| bad("a bad type")))
                .collect()
        };
        let inputs = parse_list(inputs_text)?;
        let results = if let Some(inner) = after.strip_prefix('(') {
            let inner = inner
                .strip_suffix(')')
                .ok_or_else(|| bad("no closing `)`"))?;
            parse_list(inner)?
        } else {
            vec![parse_type(after).map_err(|_| bad("a bad result type"))?]
        };
        Ok(FunctionType { inputs, results })
    }

    /// Prints it the way MLIR does.
    pub fn print(&self) -> String {
        let list = |ts: &[Type]| {
            ts.iter()
                .map(|t| t.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        if self.results.len() == 1 {
            format!("({}) -> {}", list(&self.inputs), self.results[0])
        } else {
            format!("({}) -> ({})", list(&self.inputs), list(&self.results))
        }
    }
}

/// At most 80 characters of `text`, for messages.
pub fn shorten(text: &str) -> String {
    let mut s: String = text.chars().take(80).collect();
    if s.len() < text.len() {
        s.push('…');
    }
    s
}

/// The first string literal in a location, resolving `#locN` aliases through `aliases`
/// (`loc("jit(f)/dot_general"(#loc3))` → `jit(f)/dot_general`).
pub fn loc_name(loc: &str, aliases: &std::collections::HashMap<String, String>) -> Option<String> {
    let mut text = loc.to_string();
    for _ in 0..8 {
        let inner = text.trim().strip_prefix("loc(")?.strip_suffix(')')?.trim();
        if let Some(rest) = inner.strip_prefix('"') {
            let end = rest.find('"')?;
            return Some(rest[..end].to_string());
        }
        if inner.starts_with('#') {
            text = aliases.get(inner)?.clone();
            continue;
        }
        if let Some(rest) = inner.strip_prefix("callsite(") {
            let name = rest.split(" at ").next()?.trim();
            if name.starts_with('#') {
                text = aliases.get(name)?.clone();
                continue;
            }
            text = format!("loc({name})");
            continue;
        }
        if let Some(rest) = inner.strip_prefix("fused[") {
            let first = split_top(rest.strip_suffix(']')?).into_iter().next()?;
            text = if first.starts_with('#') {
                aliases.get(first)?.clone()
            } else {
                format!("loc({first})")
            };
            continue;
        }
        return None;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dims_and_types() {
        let d = DotDims::parse("#stablehlo.dot<lhs_batching_dimensions = [0], rhs_batching_dimensions = [1], lhs_contracting_dimensions = [2, 3], rhs_contracting_dimensions = [0, 2]>").unwrap();
        assert_eq!(d.lhs_contracting, vec![2, 3]);
        assert_eq!(d.rhs_batching, vec![1]);
        assert_eq!(parse_array_i64("array<i64: 1, 0>"), Some(vec![1, 0]));
        assert_eq!(parse_array_i64("array<i64>"), Some(vec![]));
        assert_eq!(array_i64(&[]), "array<i64>");
        let ft = FunctionType::parse(
            "(tensor<2xf32>, tensor<f32>) -> (tensor<2xf32>, tensor<i1>)",
            Pos::default(),
        )
        .unwrap();
        assert_eq!(ft.inputs.len(), 2);
        assert_eq!(
            ft.print(),
            "(tensor<2xf32>, tensor<f32>) -> (tensor<2xf32>, tensor<i1>)"
        );
        assert_eq!(fmt_f32(0.5), "5.000000000e-1");
        assert_eq!(fmt_f32(448.0), "4.480000000e2");
        let mut aliases = std::collections::HashMap::new();
        aliases.insert("#loc3".to_string(), "loc(\"a/b\"(#loc1))".to_string());
        assert_eq!(loc_name("loc(#loc3)", &aliases).as_deref(), Some("a/b"));
    }
}

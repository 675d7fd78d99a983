//! The passes' options: JSON objects deserialized with serde. Unknown keys are refused, and every
//! error names the key (its path, e.g. `weights[0].w_scale`), what was expected and what came.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, DeserializeOwned, Deserializer, Unexpected};
use serde::Deserialize;
use serde_json::Value;

use super::emit::Scale;
use super::ir::Pos;
use super::RewriteError;
use crate::fp8::Format;

pub(crate) fn opt_err(expected: &str, found: &str) -> RewriteError {
    RewriteError::new("options", Pos::default(), expected, found)
}

fn kind(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("{b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// Reads options `T` from `text`; `what` names them in errors ("the quantize options").
pub(crate) fn parse<T: DeserializeOwned>(text: &str, what: &str) -> Result<T, RewriteError> {
    // Syntax errors and a top level that is not an object are told as such first.
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
    if !v.is_object() {
        return Err(opt_err("a JSON object", &kind(&v)));
    }
    let mut de = serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let e = e.into_inner();
        let pos = Pos {
            line: e.line(),
            column: e.column(),
        };
        let message = e.to_string();
        let message = message
            .strip_suffix(&format!(" at line {} column {}", e.line(), e.column()))
            .unwrap_or(&message);
        let (expected, found) = split_message(message, &path, what);
        RewriteError::new("options", pos, &expected, &found)
    })
}

/// serde's message as (expected, found), with the key named.
fn split_message(message: &str, path: &str, what: &str) -> (String, String) {
    // `path` is "." for the top level, else the path of the key the error is about.
    let place = if path == "." {
        what.to_string()
    } else {
        format!("`{path}`")
    };
    if let Some(field) = message.strip_prefix("missing field ") {
        return (format!("the key {field} in {place}"), "no such key".into());
    }
    if let Some(rest) = message.strip_prefix("unknown field ") {
        let (field, known) = rest.split_once(", ").unwrap_or((rest, ""));
        // serde_path_to_error's path ends with the unknown key itself.
        let within = match path.rsplit_once('.') {
            Some((parent, _)) if !parent.is_empty() => format!("`{parent}`"),
            _ => what.to_string(),
        };
        let expected = match known
            .strip_prefix("expected one of ")
            .or_else(|| known.strip_prefix("expected "))
        {
            Some(keys) => format!("one of the keys {keys} in {within}"),
            None => format!("no key in {within}"),
        };
        return (expected, format!("the key {field}"));
    }
    match message.split_once(", expected ") {
        Some((found, expected)) => (format!("{expected} for {place}"), found.to_string()),
        None => (format!("valid {what} at {place}"), message.to_string()),
    }
}

/// A non-negative integer (an argument, site or dimension index, a byte count).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Index(pub usize);

impl<'de> Deserialize<'de> for Index {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Index, D::Error> {
        let n = serde_json::Number::deserialize(d)?;
        n.as_u64()
            .and_then(|x| usize::try_from(x).ok())
            .map(Index)
            .ok_or_else(|| {
                de::Error::invalid_value(
                    Unexpected::Other(&format!("the number {n}")),
                    &"a non-negative integer",
                )
            })
    }
}

/// A scale: a finite number > 0 once rounded to f32.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct PositiveScale(pub f32);

fn scale_from_number<E: de::Error>(n: &serde_json::Number) -> Result<PositiveScale, E> {
    let f = n.as_f64().map(|x| x as f32).unwrap_or(f32::NAN);
    if f.is_finite() && f > 0.0 {
        Ok(PositiveScale(f))
    } else {
        Err(E::invalid_value(
            Unexpected::Other(&format!("the number {n}")),
            &"a finite scale > 0 (as f32)",
        ))
    }
}

impl<'de> Deserialize<'de> for PositiveScale {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<PositiveScale, D::Error> {
        scale_from_number(&serde_json::Number::deserialize(d)?)
    }
}

/// `w_scale`: one number (per tensor) or an array of numbers (per channel).
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum WScale {
    PerTensor(f32),
    PerChannel(Vec<f32>),
}

impl<'de> Deserialize<'de> for WScale {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<WScale, D::Error> {
        struct Visit;
        impl<'de> de::Visitor<'de> for Visit {
            type Value = WScale;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a scale (a number) or an array of per-channel scales")
            }
            fn visit_f64<E: de::Error>(self, x: f64) -> Result<WScale, E> {
                match serde_json::Number::from_f64(x) {
                    Some(n) => scale_from_number(&n).map(|s| WScale::PerTensor(s.0)),
                    None => Err(E::invalid_value(
                        Unexpected::Float(x),
                        &"a finite scale > 0 (as f32)",
                    )),
                }
            }
            fn visit_u64<E: de::Error>(self, x: u64) -> Result<WScale, E> {
                scale_from_number(&x.into()).map(|s| WScale::PerTensor(s.0))
            }
            fn visit_i64<E: de::Error>(self, x: i64) -> Result<WScale, E> {
                scale_from_number(&x.into()).map(|s| WScale::PerTensor(s.0))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<WScale, A::Error> {
                let mut scales = Vec::new();
                while let Some(PositiveScale(s)) = seq.next_element()? {
                    scales.push(s);
                }
                Ok(WScale::PerChannel(scales))
            }
        }
        d.deserialize_any(Visit)
    }
}

/// An FP8 format by name: `"e4m3fn"`, `"e5m2"` or INC's names ([`Format::parse`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct FormatName(pub Format);

impl<'de> Deserialize<'de> for FormatName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<FormatName, D::Error> {
        let name = String::deserialize(d)?;
        Format::parse(&name).map(FormatName).ok_or_else(|| {
            de::Error::invalid_value(Unexpected::Str(&name), &"\"e4m3fn\" or \"e5m2\"")
        })
    }
}

/// A site number as the key of an object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct SiteKey(pub usize);

impl<'de> Deserialize<'de> for SiteKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<SiteKey, D::Error> {
        let key = String::deserialize(d)?;
        key.parse()
            .map(SiteKey)
            .map_err(|_| de::Error::invalid_value(Unexpected::Str(&key), &"site numbers as keys"))
    }
}

/// One entry of the sidecar's `args` list: its index and path (other keys ignored).
#[derive(Deserialize, Debug)]
pub(crate) struct ArgName {
    pub index: Index,
    #[serde(default)]
    pub path: Option<String>,
}

/// Argument index → path, from the sidecar's `args` list.
pub(crate) fn arg_paths(args: &Option<Vec<ArgName>>) -> BTreeMap<usize, String> {
    args.iter()
        .flatten()
        .filter_map(|a| Some((a.index.0, a.path.clone()?)))
        .collect()
}

/// One weight of the `quantize` options.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub(crate) struct WeightOption {
    pub arg: Index,
    pub format: FormatName,
    pub w_scale: WScale,
    #[serde(default)]
    pub channel_dim: Option<Index>,
    #[serde(default)]
    pub a_scale: Option<PositiveScale>,
    /// Dynamic activation scales: `fp8xla_matmul` quantizes each activation row with its own
    /// run-time amax scale (instead of the static `a_scale`).
    #[serde(default)]
    pub a_dynamic: Option<bool>,
}

/// The options of `quantize` as JSON gives them (see the [`super`] documentation).
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub(crate) struct QuantizeJson {
    pub weights: Vec<WeightOption>,
    #[serde(default)]
    pub entry: Option<String>,
    #[serde(default)]
    pub skip_args: Option<Vec<Index>>,
    #[serde(default)]
    pub skip_sites: Option<Vec<Index>>,
    #[serde(default)]
    pub a_scales: Option<BTreeMap<SiteKey, PositiveScale>>,
    #[serde(default)]
    pub strict: Option<bool>,
    #[serde(default)]
    pub update_slices_in_place: Option<bool>,
    #[serde(default)]
    pub decode_dots: Option<bool>,
    #[serde(default)]
    pub decode_dots_min_bytes: Option<Index>,
    #[serde(default)]
    pub sampler_argmax: Option<bool>,
    #[serde(default)]
    pub sampler_argmax_min_size: Option<Index>,
    #[serde(default)]
    pub args: Option<Vec<ArgName>>,
    /// Whether the pass `shard_calls` runs last (default true; nothing to do unless the
    /// module has a mesh and sharded arguments).
    #[serde(default)]
    pub shard_calls: Option<bool>,
    /// The FP8 format of the decode loop's KV caches (pass `fp8_kv_cache`); absent or null:
    /// they stay float32.
    #[serde(default)]
    pub kv_cache: Option<FormatName>,
}

/// The options of `instrument`.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub(crate) struct InstrumentJson {
    #[serde(default)]
    pub weights: Option<Vec<Index>>,
    #[serde(default)]
    pub entry: Option<String>,
    #[serde(default)]
    pub args: Option<Vec<ArgName>>,
}

/// The options of `decode_dots` run alone.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub(crate) struct DecodeDotsJson {
    #[serde(default)]
    pub min_bytes: Option<Index>,
}

/// The options of `fp8_kv_cache` run alone.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub(crate) struct KvCacheJson {
    pub format: FormatName,
}

/// The options of `sampler_argmax` run alone.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub(crate) struct SamplerArgmaxJson {
    #[serde(default)]
    pub min_size: Option<Index>,
}

/// The options of `shard_calls` run alone.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub(crate) struct ShardCallsJson {
    #[serde(default)]
    pub entry: Option<String>,
}

/// The options of a pass that takes none: `{}`.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub(crate) struct NoOptions {}

/// A weight to quantize, checked.
#[derive(Clone, Debug)]
pub(crate) struct WeightSpec {
    pub format: Format,
    pub scale: Scale,
    pub a_scale: Option<f32>,
    /// Dynamic per-row activation scales (excludes `a_scale`).
    pub a_dynamic: bool,
}

impl WeightOption {
    /// The spec, once `channel_dim` is checked to come with per-channel scales.
    pub(crate) fn spec(&self) -> Result<WeightSpec, RewriteError> {
        let arg = self.arg.0;
        let scale = match &self.w_scale {
            WScale::PerTensor(s) => Scale::PerTensor(*s),
            WScale::PerChannel(scales) => match self.channel_dim {
                Some(Index(dim)) => Scale::PerChannel {
                    dim,
                    scales: scales.clone(),
                },
                None => {
                    return Err(opt_err(
                        &format!("`channel_dim` with the per-channel `w_scale` of argument {arg}"),
                        "none",
                    ))
                }
            },
        };
        let a_dynamic = self.a_dynamic.unwrap_or(false);
        if a_dynamic && self.a_scale.is_some() {
            return Err(opt_err(
                &format!("either `a_scale` or `a_dynamic: true` for argument {arg}"),
                "both",
            ));
        }
        Ok(WeightSpec {
            format: self.format.0,
            scale,
            a_scale: self.a_scale.map(|s| s.0),
            a_dynamic,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err<T: DeserializeOwned + fmt::Debug>(text: &str) -> RewriteError {
        parse::<T>(text, "the test options").expect_err(text)
    }

    #[test]
    fn errors_name_the_key_what_was_expected_and_what_came() {
        let e = err::<QuantizeJson>(r#"{"weights": [], "strict": "yes"}"#);
        assert_eq!(e.stage, "options");
        assert_eq!(e.expected, "a boolean for `strict`");
        assert_eq!(e.found, "invalid type: string \"yes\"");
        assert_eq!((e.line, e.column), (1, 31));
        let e = err::<QuantizeJson>(
            r#"{"weights": [{"arg": 1, "format": "e5m2", "w_scale": 1, "chanel_dim": 0}]}"#,
        );
        assert!(e.expected.starts_with("one of the keys `arg`, "), "{e}");
        assert!(e.expected.ends_with(" in `weights[0]`"), "{e}");
        assert_eq!(e.found, "the key `chanel_dim`");
        let e = err::<QuantizeJson>(r#"{"weights": [{"arg": 1, "w_scale": 1}]}"#);
        assert_eq!(e.expected, "the key `format` in `weights[0]`");
        assert_eq!(e.found, "no such key");
        let e = err::<QuantizeJson>(
            r#"{"weights": [{"arg": 1, "format": "e5m2", "w_scale": [1, 0]}]}"#,
        );
        assert_eq!(
            e.expected,
            "a finite scale > 0 (as f32) for `weights[0].w_scale[1]`"
        );
        assert_eq!(e.found, "invalid value: the number 0");
        let e = err::<DecodeDotsJson>(r#"{"min_bytes": 1.5}"#);
        assert_eq!(e.expected, "a non-negative integer for `min_bytes`");
        let e = err::<NoOptions>(r#"{"x": 1}"#);
        assert_eq!(e.expected, "no key in the test options");
        assert_eq!(e.found, "the key `x`");
    }

    #[test]
    fn nulls_and_absent_keys_are_defaults_and_extra_sidecar_keys_are_ignored() {
        let o: QuantizeJson = parse(
            r#"{"weights": [{"arg": 3, "format": "fp8_e4m3", "w_scale": [0.5, 2], "channel_dim": 1, "a_scale": null}],
                "entry": null, "a_scales": {"7": 0.25}, "args": [{"index": 3, "path": "w", "shape": [2]}]}"#,
            "the test options",
        )
        .unwrap();
        let spec = o.weights[0].spec().unwrap();
        assert_eq!(spec.format, Format::E4m3fn);
        assert_eq!(
            spec.scale,
            Scale::PerChannel {
                dim: 1,
                scales: vec![0.5, 2.0]
            }
        );
        assert_eq!(spec.a_scale, None);
        assert_eq!(o.entry, None);
        assert_eq!(o.a_scales.unwrap()[&SiteKey(7)], PositiveScale(0.25));
        assert_eq!(arg_paths(&o.args)[&3], "w");
    }
}

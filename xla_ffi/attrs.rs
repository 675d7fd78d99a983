//! Attributes of a call, looked up by name with typed getters.
//!
//! XLA passes attributes sorted by name; names are byte spans. Floats may come as F32 or F64
//! (Python floats are F64), integers as S32 or S64: the getters accept both.
use super::buffers::DataType;
use super::error::FfiError;
use super::raw;

/// One attribute value as XLA passed it.
#[derive(Clone, Copy)]
enum Value<'a> {
    Scalar(DataType, *const u8),
    Array(DataType, usize, *const u8),
    Str(&'a str),
    Dict(Attrs<'a>),
}

/// The attributes of a call (or of a dictionary attribute).
#[derive(Clone, Copy)]
pub struct Attrs<'a> {
    raw: &'a raw::XLA_FFI_Attrs,
}

impl<'a> Attrs<'a> {
    /// # Safety
    /// `raw` must be a valid `XLA_FFI_Attrs` whose arrays and values outlive `'a`.
    pub(crate) unsafe fn new(raw: &'a raw::XLA_FFI_Attrs) -> Attrs<'a> {
        Attrs { raw }
    }

    fn count(&self) -> usize {
        usize::try_from(self.raw.size).unwrap_or(0)
    }

    fn name_bytes_at(&self, i: usize) -> &'a [u8] {
        // SAFETY: i < size; `names[i]` points to a byte span live for 'a (Attrs::new contract).
        let span = unsafe { &**self.raw.names.add(i) };
        if span.len == 0 {
            return &[];
        }
        // SAFETY: the span's `ptr` holds `len` bytes live for 'a.
        unsafe { std::slice::from_raw_parts(span.ptr as *const u8, span.len) }
    }

    fn name_at(&self, i: usize) -> &'a str {
        std::str::from_utf8(self.name_bytes_at(i)).unwrap_or("<non-utf8 attribute name>")
    }

    fn value_at(&self, i: usize) -> Value<'a> {
        // SAFETY: i < size; `types` and `attrs` hold `size` entries (Attrs::new contract).
        let (ty, ptr) = unsafe { (*self.raw.types.add(i), *self.raw.attrs.add(i)) };
        match ty {
            raw::XLA_FFI_AttrType_SCALAR => {
                // SAFETY: XLA passes an XLA_FFI_Scalar for scalar attributes.
                let s = unsafe { &*(ptr as *const raw::XLA_FFI_Scalar) };
                Value::Scalar(DataType::from_raw(s.dtype), s.value as *const u8)
            }
            raw::XLA_FFI_AttrType_ARRAY => {
                // SAFETY: XLA passes an XLA_FFI_Array for array attributes.
                let a = unsafe { &*(ptr as *const raw::XLA_FFI_Array) };
                Value::Array(DataType::from_raw(a.dtype), a.size, a.data as *const u8)
            }
            raw::XLA_FFI_AttrType_STRING => {
                // SAFETY: XLA passes an XLA_FFI_ByteSpan for string attributes.
                let s = unsafe { &*(ptr as *const raw::XLA_FFI_ByteSpan) };
                let bytes = if s.len == 0 {
                    &[][..]
                } else {
                    // SAFETY: the span's `ptr` holds `len` bytes live for 'a.
                    unsafe { std::slice::from_raw_parts(s.ptr as *const u8, s.len) }
                };
                Value::Str(std::str::from_utf8(bytes).unwrap_or("<non-utf8 string>"))
            }
            _ => {
                // SAFETY: the remaining kind is a dictionary: XLA passes an XLA_FFI_Attrs.
                let d = unsafe { &*(ptr as *const raw::XLA_FFI_Attrs) };
                // SAFETY: nested attributes live as long as the outer ones.
                Value::Dict(unsafe { Attrs::new(d) })
            }
        }
    }

    // Names are compared as bytes: these lookups run on every call of every custom call.
    fn find(&self, name: &str) -> Option<Value<'a>> {
        (0..self.count())
            .find(|&i| self.name_bytes_at(i) == name.as_bytes())
            .map(|i| self.value_at(i))
    }

    /// Fails on any attribute not in `known`, naming it and listing the accepted ones.
    pub fn reject_unknown(&self, known: &[&str]) -> Result<(), FfiError> {
        for i in 0..self.count() {
            let name = self.name_bytes_at(i);
            if !known.iter().any(|k| k.as_bytes() == name) {
                return Err(FfiError::invalid(format!(
                    "unknown attribute `{}` (accepted: {})",
                    self.name_at(i),
                    known.join(", ")
                )));
            }
        }
        Ok(())
    }

    fn required<T>(
        &self,
        name: &str,
        get: impl FnOnce(Value<'a>) -> Result<T, String>,
    ) -> Result<T, FfiError> {
        self.optional(name, get)?
            .ok_or_else(|| FfiError::invalid(format!("missing attribute `{name}`")))
    }

    fn optional<T>(
        &self,
        name: &str,
        get: impl FnOnce(Value<'a>) -> Result<T, String>,
    ) -> Result<Option<T>, FfiError> {
        self.find(name)
            .map(get)
            .transpose()
            .map_err(|e| FfiError::invalid(format!("attribute `{name}`: {e}")))
    }

    /// A float scalar (F32 or F64; F64 is rounded to f32).
    pub fn f32(&self, name: &str) -> Result<f32, FfiError> {
        self.required(name, scalar_f64).map(|v| v as f32)
    }
    pub fn opt_f32(&self, name: &str) -> Result<Option<f32>, FfiError> {
        self.optional(name, scalar_f64).map(|v| v.map(|x| x as f32))
    }
    /// A float scalar as f64 (F32 or F64).
    pub fn f64(&self, name: &str) -> Result<f64, FfiError> {
        self.required(name, scalar_f64)
    }
    /// An integer scalar (S32 or S64).
    pub fn i64(&self, name: &str) -> Result<i64, FfiError> {
        self.required(name, scalar_i64)
    }
    pub fn opt_i64(&self, name: &str) -> Result<Option<i64>, FfiError> {
        self.optional(name, scalar_i64)
    }
    /// An integer scalar that must fit in i32.
    pub fn i32(&self, name: &str) -> Result<i32, FfiError> {
        self.required(name, |v| {
            let x = scalar_i64(v)?;
            i32::try_from(x).map_err(|_| format!("expected a 32-bit integer, got {x}"))
        })
    }
    pub fn bool(&self, name: &str) -> Result<bool, FfiError> {
        self.required(name, scalar_bool)
    }
    pub fn opt_bool(&self, name: &str) -> Result<Option<bool>, FfiError> {
        self.optional(name, scalar_bool)
    }
    pub fn str(&self, name: &str) -> Result<&'a str, FfiError> {
        self.required(name, string)
    }
    pub fn opt_str(&self, name: &str) -> Result<Option<&'a str>, FfiError> {
        self.optional(name, string)
    }
    /// An integer array (S32 or S64 elements).
    pub fn i64_array(&self, name: &str) -> Result<Vec<i64>, FfiError> {
        self.required(name, array_i64)
    }
    pub fn opt_i64_array(&self, name: &str) -> Result<Option<Vec<i64>>, FfiError> {
        self.optional(name, array_i64)
    }
    /// A float array (F32 or F64 elements).
    pub fn f32_array(&self, name: &str) -> Result<Vec<f32>, FfiError> {
        self.required(name, array_f32)
    }
    pub fn dict(&self, name: &str) -> Result<Attrs<'a>, FfiError> {
        self.required(name, |v| match v {
            Value::Dict(d) => Ok(d),
            other => Err(format!("expected a dictionary, got {}", kind(&other))),
        })
    }
}

fn kind(v: &Value<'_>) -> String {
    match v {
        Value::Scalar(t, _) => format!("a scalar of type {}", t.name()),
        Value::Array(t, _, _) => format!("an array of {}", t.name()),
        Value::Str(_) => "a string".into(),
        Value::Dict(_) => "a dictionary".into(),
    }
}

fn scalar_f64(v: Value<'_>) -> Result<f64, String> {
    match v {
        // SAFETY: an F32 scalar's value points to one f32 (possibly unaligned: read_unaligned).
        Value::Scalar(DataType::F32, p) => Ok(unsafe { (p as *const f32).read_unaligned() } as f64),
        // SAFETY: an F64 scalar's value points to one f64.
        Value::Scalar(DataType::F64, p) => Ok(unsafe { (p as *const f64).read_unaligned() }),
        other => Err(format!(
            "expected a float32/float64 scalar, got {}",
            kind(&other)
        )),
    }
}

fn scalar_i64(v: Value<'_>) -> Result<i64, String> {
    match v {
        // SAFETY: an S32 scalar's value points to one i32.
        Value::Scalar(DataType::S32, p) => Ok(unsafe { (p as *const i32).read_unaligned() } as i64),
        // SAFETY: an S64 scalar's value points to one i64.
        Value::Scalar(DataType::S64, p) => Ok(unsafe { (p as *const i64).read_unaligned() }),
        other => Err(format!(
            "expected an int32/int64 scalar, got {}",
            kind(&other)
        )),
    }
}

fn scalar_bool(v: Value<'_>) -> Result<bool, String> {
    match v {
        // SAFETY: a PRED scalar's value points to one byte.
        Value::Scalar(DataType::Pred, p) => Ok(unsafe { p.read() } != 0),
        other => Err(format!("expected a bool scalar, got {}", kind(&other))),
    }
}

fn string<'a>(v: Value<'a>) -> Result<&'a str, String> {
    match v {
        Value::Str(s) => Ok(s),
        other => Err(format!("expected a string, got {}", kind(&other))),
    }
}

fn array_i64(v: Value<'_>) -> Result<Vec<i64>, String> {
    match v {
        Value::Array(DataType::S32, n, p) => Ok((0..n)
            // SAFETY: an S32 array's data holds `n` i32 values.
            .map(|i| unsafe { (p as *const i32).add(i).read_unaligned() } as i64)
            .collect()),
        Value::Array(DataType::S64, n, p) => Ok((0..n)
            // SAFETY: an S64 array's data holds `n` i64 values.
            .map(|i| unsafe { (p as *const i64).add(i).read_unaligned() })
            .collect()),
        other => Err(format!(
            "expected an array of int32/int64, got {}",
            kind(&other)
        )),
    }
}

fn array_f32(v: Value<'_>) -> Result<Vec<f32>, String> {
    match v {
        Value::Array(DataType::F32, n, p) => Ok((0..n)
            // SAFETY: an F32 array's data holds `n` f32 values.
            .map(|i| unsafe { (p as *const f32).add(i).read_unaligned() })
            .collect()),
        Value::Array(DataType::F64, n, p) => Ok((0..n)
            // SAFETY: an F64 array's data holds `n` f64 values.
            .map(|i| unsafe { (p as *const f64).add(i).read_unaligned() } as f32)
            .collect()),
        other => Err(format!(
            "expected an array of float32/float64, got {}",
            kind(&other)
        )),
    }
}

//! Typed views of the operand and result buffers of one call.
use super::error::FfiError;
use super::raw;
use std::marker::PhantomData;

/// Element types fp8xla deals with; everything else is `Other(code)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataType {
    Pred,
    S8,
    S32,
    S64,
    U8,
    F16,
    F32,
    F64,
    Bf16,
    F8e4m3fn,
    F8e5m2,
    Other(u32),
}

impl DataType {
    pub(crate) fn from_raw(code: raw::XLA_FFI_DataType) -> DataType {
        match code {
            raw::XLA_FFI_DataType_PRED => DataType::Pred,
            raw::XLA_FFI_DataType_S8 => DataType::S8,
            raw::XLA_FFI_DataType_S32 => DataType::S32,
            raw::XLA_FFI_DataType_S64 => DataType::S64,
            raw::XLA_FFI_DataType_U8 => DataType::U8,
            raw::XLA_FFI_DataType_F16 => DataType::F16,
            raw::XLA_FFI_DataType_F32 => DataType::F32,
            raw::XLA_FFI_DataType_F64 => DataType::F64,
            raw::XLA_FFI_DataType_BF16 => DataType::Bf16,
            raw::XLA_FFI_DataType_F8E4M3FN => DataType::F8e4m3fn,
            raw::XLA_FFI_DataType_F8E5M2 => DataType::F8e5m2,
            other => DataType::Other(other),
        }
    }

    /// The name JAX uses for the type (`float32`, `bfloat16`, `float8_e4m3fn`, ...).
    pub fn name(self) -> String {
        match self {
            DataType::Pred => "bool".into(),
            DataType::S8 => "int8".into(),
            DataType::S32 => "int32".into(),
            DataType::S64 => "int64".into(),
            DataType::U8 => "uint8".into(),
            DataType::F16 => "float16".into(),
            DataType::F32 => "float32".into(),
            DataType::F64 => "float64".into(),
            DataType::Bf16 => "bfloat16".into(),
            DataType::F8e4m3fn => "float8_e4m3fn".into(),
            DataType::F8e5m2 => "float8_e5m2".into(),
            DataType::Other(code) => format!("XLA data type #{code}"),
        }
    }

    /// Bytes per element, for the types fp8xla knows (`None` for `Other`).
    pub fn byte_size(self) -> Option<usize> {
        match self {
            DataType::Pred | DataType::S8 | DataType::U8 => Some(1),
            DataType::F8e4m3fn | DataType::F8e5m2 => Some(1),
            DataType::F16 | DataType::Bf16 => Some(2),
            DataType::S32 | DataType::F32 => Some(4),
            DataType::S64 | DataType::F64 => Some(8),
            DataType::Other(_) => None,
        }
    }
}

/// Rust element types a buffer can be viewed as.
pub trait Element: Copy + 'static {
    /// Whether buffers of `dtype` hold this element type.
    fn matches(dtype: DataType) -> bool;
}

impl Element for f32 {
    fn matches(dtype: DataType) -> bool {
        dtype == DataType::F32
    }
}
impl Element for half::bf16 {
    fn matches(dtype: DataType) -> bool {
        dtype == DataType::Bf16
    }
}
/// FP8 codes (either format) and raw bytes.
impl Element for u8 {
    fn matches(dtype: DataType) -> bool {
        matches!(
            dtype,
            DataType::F8e4m3fn | DataType::F8e5m2 | DataType::U8 | DataType::S8
        )
    }
}
impl Element for i32 {
    fn matches(dtype: DataType) -> bool {
        dtype == DataType::S32
    }
}
impl Element for i64 {
    fn matches(dtype: DataType) -> bool {
        dtype == DataType::S64
    }
}

/// Shape and data pointer shared by operands and results.
#[derive(Clone, Copy)]
struct View<'a> {
    dtype: DataType,
    dims: &'a [i64],
    data: *mut u8,
}

impl<'a> View<'a> {
    /// # Safety
    /// `buf` must point to a valid `XLA_FFI_Buffer` that outlives `'a`.
    unsafe fn new(buf: *const raw::XLA_FFI_Buffer) -> Result<View<'a>, FfiError> {
        if buf.is_null() {
            return Err(FfiError::internal("XLA passed a null buffer"));
        }
        // SAFETY: the caller guarantees `buf` is a live XLA_FFI_Buffer for 'a.
        let b = unsafe { &*buf };
        let rank = usize::try_from(b.rank)
            .map_err(|_| FfiError::internal(format!("buffer with negative rank {}", b.rank)))?;
        let dims = if rank == 0 {
            &[][..]
        } else {
            // SAFETY: XLA guarantees `dims` holds `rank` entries that live as long as the buffer.
            unsafe { std::slice::from_raw_parts(b.dims, rank) }
        };
        if dims.iter().any(|&d| d < 0) {
            return Err(FfiError::internal(format!(
                "buffer with negative dims {dims:?}"
            )));
        }
        Ok(View {
            dtype: DataType::from_raw(b.dtype),
            dims,
            data: b.data as *mut u8,
        })
    }

    fn len(&self) -> usize {
        self.dims.iter().map(|&d| d as usize).product()
    }

    /// The bytes the buffer spans. For a dtype of unknown size it counts one byte per
    /// element, a lower bound: such buffers are never read or written (every accessor refuses
    /// an unknown dtype), so an overlap this misses is harmless.
    fn byte_range(&self) -> std::ops::Range<usize> {
        let start = self.data as usize;
        let bytes = self.len() * self.dtype.byte_size().unwrap_or(1);
        start..start.saturating_add(bytes)
    }

    fn check<T: Element>(&self, what: &str) -> Result<(), FfiError> {
        if !T::matches(self.dtype) {
            return Err(FfiError::invalid(format!(
                "{what}: cannot be read as {} (dtype {})",
                std::any::type_name::<T>(),
                self.dtype.name()
            )));
        }
        if self.len() > 0
            && (self.data.is_null() || self.data.align_offset(std::mem::align_of::<T>()) != 0)
        {
            return Err(FfiError::internal(format!(
                "{what}: data pointer is null or misaligned"
            )));
        }
        Ok(())
    }
}

/// An operand buffer, read-only (a cheap copyable view).
#[derive(Clone, Copy)]
pub struct Arg<'a> {
    view: View<'a>,
    _life: PhantomData<&'a [u8]>,
}

impl<'a> Arg<'a> {
    /// # Safety
    /// `buf` must point to a valid `XLA_FFI_Buffer` that outlives `'a`, whose data is not
    /// written during `'a`.
    pub(crate) unsafe fn new(buf: *const raw::XLA_FFI_Buffer) -> Result<Arg<'a>, FfiError> {
        Ok(Arg {
            // SAFETY: forwarded from the caller.
            view: unsafe { View::new(buf)? },
            _life: PhantomData,
        })
    }
    pub fn dtype(&self) -> DataType {
        self.view.dtype
    }
    pub fn dims(&self) -> &'a [i64] {
        self.view.dims
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.view.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The elements, if the dtype is one `T` stands for; `what` names the operand in errors.
    pub fn slice<T: Element>(&self, what: &str) -> Result<&'a [T], FfiError> {
        self.view.check::<T>(what)?;
        if self.is_empty() {
            return Ok(&[]);
        }
        // SAFETY: `check` verified dtype, non-null and alignment; XLA's buffer holds `len`
        // elements of that dtype, is live for 'a and is not written while we read it.
        Ok(unsafe { std::slice::from_raw_parts(self.view.data as *const T, self.len()) })
    }
    /// The raw row-major bytes, whatever the dtype (if its element size is known).
    pub fn bytes(&self, what: &str) -> Result<&'a [u8], FfiError> {
        let size = self.dtype().byte_size().ok_or_else(|| {
            FfiError::invalid(format!(
                "{what}: expected dtype {SIZED_DTYPES}, got {}",
                self.dtype().name()
            ))
        })?;
        if self.is_empty() {
            return Ok(&[]);
        }
        if self.view.data.is_null() {
            return Err(FfiError::internal(format!("{what}: data pointer is null")));
        }
        // SAFETY: the buffer holds `len` elements of `size` bytes, is live for 'a and is not
        // written while we read it; u8 needs no alignment.
        Ok(unsafe { std::slice::from_raw_parts(self.view.data as *const u8, self.len() * size) })
    }
}

/// Whether two buffers share any byte.
fn overlap(a: &View, b: &View) -> bool {
    let (a, b) = (a.byte_range(), b.byte_range());
    !a.is_empty() && !b.is_empty() && a.start < b.end && b.start < a.end
}

/// A result buffer, written once by the handler.
pub struct Ret<'a> {
    view: View<'a>,
    _life: PhantomData<&'a mut [u8]>,
}

impl<'a> Ret<'a> {
    /// # Safety
    /// `buf` must point to a valid `XLA_FFI_Buffer` that outlives `'a`, not aliased by any
    /// other operand or result and not otherwise accessed during `'a`.
    pub(crate) unsafe fn new(buf: *const raw::XLA_FFI_Buffer) -> Result<Ret<'a>, FfiError> {
        Ok(Ret {
            // SAFETY: forwarded from the caller.
            view: unsafe { View::new(buf)? },
            _life: PhantomData,
        })
    }
    pub fn dtype(&self) -> DataType {
        self.view.dtype
    }
    pub fn dims(&self) -> &'a [i64] {
        self.view.dims
    }
    pub fn len(&self) -> usize {
        self.view.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Whether this result shares memory with operand `arg`.
    pub(crate) fn overlaps(&self, arg: &Arg) -> bool {
        overlap(&self.view, &arg.view)
    }
    /// The elements for writing; consumes the view so each result is borrowed mutably once.
    pub fn into_slice<T: Element>(self, what: &str) -> Result<&'a mut [T], FfiError> {
        self.view.check::<T>(what)?;
        if self.is_empty() {
            return Ok(&mut []);
        }
        // SAFETY: `check` verified dtype, non-null and alignment; the buffer holds `len`
        // elements, is live for 'a, and (by `Ret::new`'s contract and by consuming `self`) no
        // other reference to it exists.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.view.data as *mut T, self.len()) })
    }
}

/// A result that updates an operand in place (the custom call declares
/// `output_operand_aliases` for the pair): its bytes hold the operand's value on entry and
/// the handler changes only what it must. The operand itself is not readable separately.
pub struct InPlace<'a> {
    dtype: DataType,
    dims: &'a [i64],
    size: usize,
    bytes: &'a mut [u8],
}

/// The dtypes whose element size fp8xla knows (what byte-level handlers take).
pub const SIZED_DTYPES: &str =
    "bool, int8, uint8, int32, int64, float16, bfloat16, float32, float64, float8_e4m3fn or \
     float8_e5m2";

impl<'a> InPlace<'a> {
    /// Pairs result `ret` with operand `arg`: same dtype and shape, and either the very same
    /// memory (XLA honoured the alias) or memory shared with no operand at all, in which case
    /// the operand's bytes are copied in first. `what` names the pair in errors.
    ///
    /// # Safety
    /// `ret` and `arg` must come from the same live call frame; `others` must be every other
    /// operand of the call. Neither `arg` nor `ret` may be read or written through any other
    /// view during `'a`.
    pub(crate) unsafe fn new(
        ret: Ret<'a>,
        arg: Arg<'a>,
        others: &[(usize, Arg<'a>)],
        what: &str,
    ) -> Result<InPlace<'a>, FfiError> {
        let (r, a) = (ret.view, arg.view);
        if r.dtype != a.dtype || r.dims != a.dims {
            return Err(FfiError::invalid(format!(
                "{what}: expected the result to have the operand's type {}{:?}, got {}{:?}",
                a.dtype.name(),
                a.dims,
                r.dtype.name(),
                r.dims
            )));
        }
        let size = r.dtype.byte_size().ok_or_else(|| {
            FfiError::invalid(format!(
                "{what}: expected dtype {}, got {}",
                SIZED_DTYPES,
                r.dtype.name()
            ))
        })?;
        let len = r.len() * size;
        if let Some((j, _)) = others.iter().find(|(_, o)| overlap(&r, &o.view)) {
            return Err(FfiError::internal(format!(
                "{what}: expected memory shared with no other operand, got memory shared \
                 with operand {j}"
            )));
        }
        if len == 0 {
            return Ok(InPlace {
                dtype: r.dtype,
                dims: r.dims,
                size,
                bytes: &mut [],
            });
        }
        if r.data.is_null() || a.data.is_null() {
            return Err(FfiError::internal(format!(
                "{what}: null data pointer (result {}, operand {})",
                if r.data.is_null() { "null" } else { "ok" },
                if a.data.is_null() { "null" } else { "ok" }
            )));
        }
        if r.data != a.data {
            if overlap(&r, &a) {
                return Err(FfiError::internal(format!(
                    "{what}: expected the very buffer of the operand or a separate one, got \
                     one that partly overlaps it"
                )));
            }
            // SAFETY: both buffers hold `len` bytes (same dtype and shape), are live for the
            // call, and do not overlap (checked just above).
            unsafe { std::ptr::copy_nonoverlapping(a.data as *const u8, r.data, len) };
        }
        Ok(InPlace {
            dtype: r.dtype,
            dims: r.dims,
            size,
            // SAFETY: the result holds `len` bytes live for 'a, and by this function's
            // contract nothing else reads or writes it (or the operand it aliases) meanwhile.
            bytes: unsafe { std::slice::from_raw_parts_mut(r.data, len) },
        })
    }
    pub fn dtype(&self) -> DataType {
        self.dtype
    }
    pub fn dims(&self) -> &'a [i64] {
        self.dims
    }
    /// Bytes per element.
    pub fn elem_size(&self) -> usize {
        self.size
    }
    /// The buffer's bytes, row-major, holding the operand's value until changed.
    pub fn bytes(&mut self) -> &mut [u8] {
        self.bytes
    }
}

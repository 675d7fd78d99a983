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

//! The path from XLA into a handler: metadata handshake, stage check, call frame decoding,
//! panic guard, and conversion of errors into `XLA_FFI_Error`.
use super::attrs::Attrs;
use super::buffers::{Arg, InPlace, Ret};
use super::error::FfiError;
use super::pool::XlaPool;
use super::raw;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// One invocation of a custom call, as a handler sees it.
pub struct Call<'a> {
    target: &'static str,
    /// Operands; `None` for one a result updates in place (read it through that result).
    args: Vec<Option<Arg<'a>>>,
    rets: Vec<Option<Ret<'a>>>,
    in_place: Vec<Option<InPlace<'a>>>,
    attrs: Attrs<'a>,
    pool: XlaPool<'a>,
}

impl<'a> Call<'a> {
    /// The custom-call target name.
    pub fn target(&self) -> &'static str {
        self.target
    }
    pub fn num_args(&self) -> usize {
        self.args.len()
    }
    pub fn num_rets(&self) -> usize {
        self.rets.len()
    }
    /// Operand `i`.
    pub fn arg(&self, i: usize) -> Result<Arg<'a>, FfiError> {
        match self.args.get(i) {
            Some(Some(a)) => Ok(*a),
            Some(None) => Err(FfiError::internal(format!(
                "operand {i} is updated in place: read it through its result"
            ))),
            None => Err(FfiError::invalid(format!(
                "expected at least {} operand(s), got {}",
                i + 1,
                self.args.len()
            ))),
        }
    }
    /// Result `i` of a target that updates an operand in place (declared with the handler);
    /// it can be taken once.
    pub fn take_in_place(&mut self, i: usize) -> Result<InPlace<'a>, FfiError> {
        self.in_place
            .get_mut(i)
            .and_then(Option::take)
            .ok_or_else(|| FfiError::internal(format!("result {i} is not an in-place result")))
    }
    /// Result `i`; each result can be taken once.
    pub fn take_ret(&mut self, i: usize) -> Result<Ret<'a>, FfiError> {
        let n = self.rets.len();
        self.rets
            .get_mut(i)
            .ok_or_else(|| {
                FfiError::invalid(format!("expected at least {} result(s), got {n}", i + 1))
            })?
            .take()
            .ok_or_else(|| FfiError::internal(format!("result {i} taken twice")))
    }
    /// Dims of result `i` without taking it.
    pub fn ret_dims(&self, i: usize) -> Option<&'a [i64]> {
        self.rets.get(i)?.as_ref().map(|r| r.dims())
    }
    pub fn attrs(&self) -> Attrs<'a> {
        self.attrs
    }
    /// XLA's intra-op thread pool (the calling thread takes part in the work).
    pub fn pool(&self) -> &XlaPool<'a> {
        &self.pool
    }
    /// Fails unless the call has exactly `args` operands and `rets` results.
    pub fn expect_arity(&self, args: &[usize], rets: usize) -> Result<(), FfiError> {
        if !args.contains(&self.args.len()) {
            let want: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            return Err(FfiError::invalid(format!(
                "expected {} operand(s), got {}",
                want.join(" or "),
                self.args.len()
            )));
        }
        if self.rets.len() != rets {
            return Err(FfiError::invalid(format!(
                "expected {rets} result(s), got {}",
                self.rets.len()
            )));
        }
        Ok(())
    }
}

/// A handler body.
pub type Handler = fn(&mut Call<'_>) -> Result<(), FfiError>;

/// `(result, operand)` pairs a target updates in place: its custom calls declare
/// `output_operand_aliases` for them. Every other result must share memory with no operand.
pub type InPlacePairs = &'static [(usize, usize)];

/// Runs `handler` for one XLA call frame and returns NULL on success or an XLA error.
///
/// # Safety
/// `frame` must be the call frame XLA passed to the exported handler symbol.
pub(crate) unsafe fn run(
    frame: *mut raw::XLA_FFI_CallFrame,
    target: &'static str,
    handler: Handler,
    in_place: InPlacePairs,
) -> *mut raw::XLA_FFI_Error {
    if frame.is_null() {
        return std::ptr::null_mut();
    }
    // SAFETY: XLA passes a valid call frame that lives for the whole call.
    let frame = unsafe { &mut *frame };
    if frame.struct_size < raw::XLA_FFI_CallFrame_STRUCT_SIZE as usize {
        return make_error(
            frame.api,
            &FfiError::invalid(format!(
                "{target}: XLA's call frame is older than this library expects \
                 (struct_size {} < {})",
                frame.struct_size,
                raw::XLA_FFI_CallFrame_STRUCT_SIZE
            )),
        );
    }
    if !frame.extension_start.is_null() {
        // SAFETY: a non-null extension_start points to an extension header.
        let ext = unsafe { &*frame.extension_start };
        if ext.type_ == raw::XLA_FFI_Extension_Metadata {
            // SAFETY: an extension of type Metadata is an XLA_FFI_Metadata_Extension.
            return unsafe { fill_metadata(frame.api, frame.extension_start) };
        }
    }
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        if frame.stage != raw::XLA_FFI_ExecutionStage_EXECUTE {
            return Err(FfiError::invalid(format!(
                "called in execution stage {}, only EXECUTE (3) is supported",
                frame.stage
            )));
        }
        // SAFETY: the frame is valid for the duration of this call.
        let mut call = unsafe { decode(frame, target, in_place)? };
        handler(&mut call)
    }));
    match outcome {
        Ok(Ok(())) => std::ptr::null_mut(),
        Ok(Err(e)) => make_error(
            frame.api,
            &FfiError {
                code: e.code,
                message: format!("{target}: {}", e.message),
            },
        ),
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            make_error(
                frame.api,
                &FfiError::internal(format!("{target}: internal error (bug in fp8xla): {what}")),
            )
        }
    }
}

/// # Safety
/// `frame` must be a valid call frame for the lifetime `'a`.
unsafe fn decode<'a>(
    frame: &'a raw::XLA_FFI_CallFrame,
    target: &'static str,
    in_place: InPlacePairs,
) -> Result<Call<'a>, FfiError> {
    let mut args = Vec::new();
    for i in 0..usize::try_from(frame.args.size).unwrap_or(0) {
        // SAFETY: `types` and `args` hold `size` entries.
        let (ty, ptr) = unsafe { (*frame.args.types.add(i), *frame.args.args.add(i)) };
        if ty != raw::XLA_FFI_ArgType_BUFFER {
            return Err(FfiError::invalid(format!("operand {i} is not a buffer")));
        }
        // SAFETY: a BUFFER argument is an XLA_FFI_Buffer live for the call. Operands are only
        // read, except one a result updates in place: its slot is emptied below and it is
        // reached only through that `InPlace` result.
        args.push(unsafe { Arg::new(ptr as *const raw::XLA_FFI_Buffer)? });
    }
    let mut rets = Vec::new();
    for i in 0..usize::try_from(frame.rets.size).unwrap_or(0) {
        // SAFETY: `types` and `rets` hold `size` entries.
        let (ty, ptr) = unsafe { (*frame.rets.types.add(i), *frame.rets.rets.add(i)) };
        if ty != raw::XLA_FFI_RetType_BUFFER {
            return Err(FfiError::invalid(format!("result {i} is not a buffer")));
        }
        // SAFETY: a BUFFER result is an XLA_FFI_Buffer live for the call. XLA gives each
        // result memory of its own unless the call declares an alias with an operand; such
        // pairs become `InPlace` below and every other result is checked against the operands.
        rets.push(Some(unsafe {
            Ret::new(ptr as *const raw::XLA_FFI_Buffer)?
        }));
    }
    // Results that share memory with an operand are allowed only as declared in-place pairs;
    // every check runs against the full operand list.
    let mut updated = Vec::new();
    for &(r, a) in in_place {
        let what = format!("result {r} (updates operand {a} in place)");
        let (Some(ret), Some(&arg)) = (rets.get_mut(r).and_then(Option::take), args.get(a)) else {
            return Err(FfiError::invalid(format!(
                "{what}: expected at least {} operand(s) and {} result(s), got {} and {}",
                a + 1,
                r + 1,
                args.len(),
                rets.len()
            )));
        };
        let others: Vec<(usize, Arg<'a>)> = args
            .iter()
            .copied()
            .enumerate()
            .filter(|&(j, _)| j != a)
            .collect();
        if updated.len() <= r {
            updated.resize_with(r + 1, || None);
        }
        // SAFETY: both come from this frame; the result was taken out of `rets` and the
        // operand's slot is emptied below, before any view of it is handed out.
        updated[r] = Some(unsafe { InPlace::new(ret, arg, &others, &what)? });
    }
    for (i, ret) in rets.iter().enumerate() {
        if let Some(ret) = ret {
            if let Some(j) = args.iter().position(|a| ret.overlaps(a)) {
                return Err(FfiError::invalid(format!(
                    "result {i}: expected memory of its own, got memory shared with operand \
                     {j} (this custom call does not update operands in place: drop the \
                     input/output alias)"
                )));
            }
        }
    }
    let mut args: Vec<Option<Arg<'a>>> = args.into_iter().map(Some).collect();
    for &(_, a) in in_place {
        args[a] = None;
    }
    Ok(Call {
        target,
        args,
        rets,
        in_place: updated,
        // SAFETY: the attributes live as long as the frame.
        attrs: unsafe { Attrs::new(&frame.attrs) },
        // SAFETY: api and ctx come from the live frame.
        pool: unsafe { XlaPool::new(frame.api, frame.ctx) },
    })
}

/// Answers XLA's metadata probe: the FFI API version this library was built against.
///
/// # Safety
/// `ext` must point to an `XLA_FFI_Metadata_Extension`.
unsafe fn fill_metadata(
    api: *const raw::XLA_FFI_Api,
    ext: *mut raw::XLA_FFI_Extension_Base,
) -> *mut raw::XLA_FFI_Error {
    // SAFETY: guaranteed by the caller.
    let ext = unsafe { &mut *(ext as *mut raw::XLA_FFI_Metadata_Extension) };
    if ext.metadata.is_null()
        // SAFETY: metadata checked non-null just before.
        || unsafe { (*ext.metadata).struct_size } < raw::XLA_FFI_Metadata_STRUCT_SIZE as usize
    {
        return make_error(
            api,
            &FfiError::invalid("fp8xla: XLA's metadata struct is too small"),
        );
    }
    // SAFETY: metadata is non-null and large enough.
    let md = unsafe { &mut *ext.metadata };
    md.api_version = raw::XLA_FFI_Api_Version {
        struct_size: raw::XLA_FFI_Api_Version_STRUCT_SIZE as usize,
        extension_start: std::ptr::null_mut(),
        major_version: raw::XLA_FFI_API_MAJOR as i32,
        minor_version: raw::XLA_FFI_API_MINOR as i32,
    };
    md.traits = 0;
    std::ptr::null_mut()
}

/// Creates an XLA error carrying `err` (NULL if XLA's API is unavailable).
pub(crate) fn make_error(api: *const raw::XLA_FFI_Api, err: &FfiError) -> *mut raw::XLA_FFI_Error {
    if api.is_null() {
        return std::ptr::null_mut();
    }
    let msg = std::ffi::CString::new(err.message.replace('\0', " ")).unwrap_or_default();
    let mut args = raw::XLA_FFI_Error_Create_Args {
        struct_size: raw::XLA_FFI_Error_Create_Args_STRUCT_SIZE as usize,
        extension_start: std::ptr::null_mut(),
        message: msg.as_ptr(),
        errc: err.code as raw::XLA_FFI_Error_Code,
    };
    // SAFETY: `api` is XLA's API table; Error_Create copies the message before returning.
    match unsafe { (*api).XLA_FFI_Error_Create } {
        // SAFETY: the function pointer comes from XLA's API table and `args` is initialized.
        Some(create) => unsafe { create(&mut args) },
        None => std::ptr::null_mut(),
    }
}

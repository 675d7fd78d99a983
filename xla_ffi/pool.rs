//! XLA's intra-op thread pool as a [`Parallel`] executor.
//!
//! The handler may itself run on a pool thread, so the calling thread never just waits: it
//! claims tasks from the same counter as the helpers it scheduled, and afterwards waits only
//! for tasks other threads already claimed (those are running, so the wait is short and cannot
//! deadlock). Helpers scheduled after all work is gone find nothing to claim and return.
use super::raw;
use crate::parallel::Parallel;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// XLA's intra-op pool for one call (falls back to the calling thread if XLA has none).
pub struct XlaPool<'a> {
    api: *const raw::XLA_FFI_Api,
    ctx: *mut raw::XLA_FFI_ExecutionContext,
    threads: usize,
    _life: PhantomData<&'a ()>,
}

// SAFETY: the pool handle is only used from the handler's thread and XLA's pool API is
// thread-safe; `Parallel: Sync` needs this so kernels can take `&dyn Parallel`.
unsafe impl Sync for XlaPool<'_> {}

/// State shared by the caller and the helpers of one `run`.
struct Shared {
    n: usize,
    next: AtomicUsize,
    done: AtomicUsize,
    panicked: AtomicBool,
    /// `&dyn Fn(usize) + Sync` with its lifetime erased; dereferenced only after claiming an
    /// index `< n`, which can only happen before `run` returns (it waits for `done == n`).
    task: *const (dyn Fn(usize) + Sync + 'static),
}

// SAFETY: `task` points to a `Sync` closure; all other fields are atomics.
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

impl Shared {
    /// Claims and runs tasks until none are left.
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::AcqRel);
            if i >= self.n {
                return;
            }
            // SAFETY: i < n was claimed, so `run` has not returned yet and the closure is live.
            let task = unsafe { &*self.task };
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| task(i))).is_err() {
                self.panicked.store(true, Ordering::Release);
            }
            self.done.fetch_add(1, Ordering::AcqRel);
        }
    }
}

extern "C" fn helper_entry(data: *mut std::ffi::c_void) {
    // SAFETY: `data` is an `Arc<Shared>` leaked by `XlaPool::run` for exactly this task.
    let shared = unsafe { Arc::from_raw(data as *const Shared) };
    shared.work();
}

impl<'a> XlaPool<'a> {
    /// # Safety
    /// `api` and `ctx` must be those of the live call frame.
    pub(crate) unsafe fn new(
        api: *const raw::XLA_FFI_Api,
        ctx: *mut raw::XLA_FFI_ExecutionContext,
    ) -> XlaPool<'a> {
        let mut pool = XlaPool {
            api,
            ctx,
            threads: 1,
            _life: PhantomData,
        };
        pool.threads = pool.query_threads().unwrap_or(1).max(1);
        pool
    }

    fn query_threads(&self) -> Option<usize> {
        if self.api.is_null() || self.ctx.is_null() {
            return None;
        }
        let mut n: i64 = 0;
        let mut args = raw::XLA_FFI_ThreadPool_NumThreads_Args {
            struct_size: raw::XLA_FFI_ThreadPool_NumThreads_Args_STRUCT_SIZE as usize,
            extension_start: std::ptr::null_mut(),
            ctx: self.ctx,
            num_threads: &mut n,
        };
        // SAFETY: api is XLA's table for this call.
        let f = unsafe { (*self.api).XLA_FFI_ThreadPool_NumThreads }?;
        // SAFETY: args is initialized and `n` outlives the call.
        let err = unsafe { f(&mut args) };
        if !err.is_null() {
            self.discard(err);
            return None;
        }
        usize::try_from(n).ok()
    }

    fn discard(&self, err: *mut raw::XLA_FFI_Error) {
        let mut args = raw::XLA_FFI_Error_Destroy_Args {
            struct_size: raw::XLA_FFI_Error_Destroy_Args_STRUCT_SIZE as usize,
            extension_start: std::ptr::null_mut(),
            error: err,
        };
        // SAFETY: api is XLA's table; `err` is an error it returned to us and we own.
        if let Some(destroy) = unsafe { (*self.api).XLA_FFI_Error_Destroy } {
            // SAFETY: args is initialized.
            unsafe { destroy(&mut args) };
        }
    }

    /// Schedules one helper; false if XLA refused (no pool).
    fn schedule(&self, shared: &Arc<Shared>) -> bool {
        // SAFETY: api is XLA's table for this call.
        let Some(schedule) = (unsafe { (*self.api).XLA_FFI_ThreadPool_Schedule }) else {
            return false;
        };
        let data = Arc::into_raw(Arc::clone(shared)) as *mut std::ffi::c_void;
        let mut args = raw::XLA_FFI_ThreadPool_Schedule_Args {
            struct_size: raw::XLA_FFI_ThreadPool_Schedule_Args_STRUCT_SIZE as usize,
            extension_start: std::ptr::null_mut(),
            ctx: self.ctx,
            task: Some(helper_entry),
            data,
        };
        // SAFETY: args is initialized; on success XLA runs helper_entry(data) exactly once.
        let err = unsafe { schedule(&mut args) };
        if err.is_null() {
            return true;
        }
        self.discard(err);
        // SAFETY: XLA did not take the task, so the reference we leaked for it is ours again.
        drop(unsafe { Arc::from_raw(data as *const Shared) });
        false
    }
}

impl Parallel for XlaPool<'_> {
    fn workers(&self) -> usize {
        self.threads
    }

    fn run(&self, n: usize, task: &(dyn Fn(usize) + Sync)) {
        if n <= 1 || self.threads <= 1 {
            (0..n).for_each(task);
            return;
        }
        // SAFETY: only the lifetime is erased; see `Shared::task` for why no use outlives it.
        let task: &(dyn Fn(usize) + Sync + 'static) = unsafe { std::mem::transmute(task) };
        let shared = Arc::new(Shared {
            n,
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            task,
        });
        for _ in 1..self.threads.min(n) {
            if !self.schedule(&shared) {
                break;
            }
        }
        shared.work();
        while shared.done.load(Ordering::Acquire) < n {
            std::thread::yield_now();
        }
        if shared.panicked.load(Ordering::Acquire) {
            panic!("a parallel task panicked on an XLA pool thread");
        }
    }
}

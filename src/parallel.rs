//! The parallelism the kernels see: a way to run `n` independent tasks. The custom calls back
//! it with XLA's intra-op thread pool; tests and benches use `Serial` or `ScopedThreads`.

/// Runs independent tasks, possibly at the same time.
pub trait Parallel: Sync {
    /// How many tasks can usefully run at once (at least 1, the caller included).
    fn workers(&self) -> usize;
    /// Calls `task(i)` for every `i` in `0..n`, each exactly once, and returns when all are done.
    fn run(&self, n: usize, task: &(dyn Fn(usize) + Sync));
}

/// Everything on the calling thread.
pub struct Serial;

impl Parallel for Serial {
    fn workers(&self) -> usize {
        1
    }
    fn run(&self, n: usize, task: &(dyn Fn(usize) + Sync)) {
        (0..n).for_each(task);
    }
}

/// `threads` scoped OS threads taking tasks from a shared counter: for tests and benches that
/// want real concurrency without XLA.
pub struct ScopedThreads(pub usize);

impl Parallel for ScopedThreads {
    fn workers(&self) -> usize {
        self.0.max(1)
    }
    fn run(&self, n: usize, task: &(dyn Fn(usize) + Sync)) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let next = AtomicUsize::new(0);
        let work = || loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                break;
            }
            task(i);
        };
        std::thread::scope(|s| {
            for _ in 1..self.workers().min(n.max(1)) {
                s.spawn(work);
            }
            work();
        });
    }
}

/// Splits `0..len` into at most `parts` contiguous ranges whose starts are multiples of `align`
/// (except that the last range ends at `len`). Returns the ranges in order.
pub fn split_range(len: usize, parts: usize, align: usize) -> Vec<std::ops::Range<usize>> {
    let align = align.max(1);
    let blocks = len.div_ceil(align);
    let parts = parts.clamp(1, blocks.max(1));
    let mut out = Vec::with_capacity(parts);
    let mut start_block = 0;
    for p in 0..parts {
        let end_block = blocks * (p + 1) / parts;
        let (s, e) = (start_block * align, (end_block * align).min(len));
        if s < e {
            out.push(s..e);
        }
        start_block = end_block;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn split_range_covers_everything_once() {
        for len in [0usize, 1, 5, 16, 17, 1000] {
            for parts in [1usize, 2, 3, 8, 64] {
                for align in [1usize, 4, 16] {
                    let r = split_range(len, parts, align);
                    assert!(r.len() <= parts);
                    let mut next = 0;
                    for x in &r {
                        assert_eq!(x.start, next);
                        assert!(x.start % align == 0);
                        assert!(x.end > x.start);
                        next = x.end;
                    }
                    assert_eq!(next, len, "len {len} parts {parts} align {align}");
                }
            }
        }
    }

    #[test]
    fn scoped_threads_runs_each_task_once() {
        let hits: Vec<AtomicUsize> = (0..97).map(|_| AtomicUsize::new(0)).collect();
        ScopedThreads(3).run(hits.len(), &|i| {
            hits[i].fetch_add(1, Ordering::Relaxed);
        });
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
    }
}

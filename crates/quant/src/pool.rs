//! The threads the kernels run on: one rayon pool for this process, sized once (`--threads`).
//! A model step runs inside it ([`install`]), so the kernels' parallel loops start from a pool
//! thread that takes part in the work, instead of parking the caller and waking the pool on
//! every matrix product.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

static THREADS: AtomicUsize = AtomicUsize::new(0);
static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();

/// Sets the pool's size; only before its first use (later calls change nothing). 0: the cores
/// this process may use.
pub fn set_threads(n: usize) {
    THREADS.store(n, Ordering::Relaxed);
}

/// The pool, built on first use.
pub fn pool() -> &'static rayon::ThreadPool {
    POOL.get_or_init(|| {
        let n = match THREADS.load(Ordering::Relaxed) {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(|i| format!("kernel-{i}"))
            .build()
            .expect("a thread pool")
    })
}

/// The pool's size.
pub fn threads() -> usize {
    pool().current_num_threads()
}

/// Runs `f` on one of the pool's threads (where the kernels' parallel loops use the pool).
/// Nothing in `f` may block on another pool task (an all-reduce waiting for a peer shard in
/// the same process would deadlock a full pool): one step per process only.
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    pool().install(f)
}

/// Runs `f` in the pool: directly when already on one of its threads, else handed to it.
pub fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let p = pool();
    if p.current_thread_index().is_some() {
        f()
    } else {
        p.install(f)
    }
}

//! The machine's own pace during a run. On this virtual machine the CPU
//! time a fixed piece of work takes changes by up to 1.7 times within
//! minutes, with no load of ours, and no hardware counters are exposed to
//! count instructions instead (docs/benchmark-notes.md, "Sixth pass"). So a
//! row of CPU time per event is read beside the pace measured while it was
//! taken: a thread of the driver times the same fixed work every half
//! second (about a millisecond of CPU each time, 0.2% of a core) and the
//! median of those times is recorded. Rows of two runs compare only as far
//! as their paces agree.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// The row's name.
pub(crate) const PACE: &str = "machine pace (a fixed piece of work; lower is faster)";

/// Iterations of the fixed work: a chain of dependent multiplications,
/// about a millisecond of CPU at full speed.
const WORK: u64 = 1_000_000;

/// A thread timing the fixed work until `finish`.
pub(crate) struct Pace {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<f64>>,
}

impl Pace {
    pub(crate) fn start() -> Pace {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            loop {
                samples.push(fixed_work_ms());
                if stopped.load(Ordering::Relaxed) {
                    return samples;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        });
        Pace { stop, thread }
    }

    /// The median CPU time of the fixed work while it ran, in ms (lower is
    /// a faster machine).
    pub(crate) fn finish(self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        let mut samples = self.thread.join().expect("the pace thread");
        samples.sort_by(|a, b| a.total_cmp(b));
        samples[samples.len() / 2]
    }
}

/// The CPU time this thread spends on the fixed work, in ms.
fn fixed_work_ms() -> f64 {
    let before = thread_cpu_seconds();
    let mut x: u64 = 1;
    for i in 0..WORK {
        // NB: black_box at each step, or the compiler folds the chain.
        x = std::hint::black_box(x)
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(i);
    }
    std::hint::black_box(x);
    (thread_cpu_seconds() - before) * 1000.0
}

fn thread_cpu_seconds() -> f64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only the timespec it is given, a local
    // that outlives the call; CLOCK_THREAD_CPUTIME_ID always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    now.tv_sec as f64 + now.tv_nsec as f64 / 1e9
}

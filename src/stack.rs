//! The stacks of database threads: started lean, and given back when a thread goes idle.
//!
//! `walsync watch` runs one thread per database, so what a thread costs beyond its work is
//! paid ten thousand times on a host of tenants:
//!
//! - [`spawn`] starts a thread with `pthread_create` itself rather than `std::thread`. The
//!   standard library gives every thread it starts an alternate signal stack (to report a
//!   stack overflow by name), an extra mapping and a guard page: two of the five memory
//!   maps an idle database held, when Linux allows 65,530 maps per process
//!   (`vm.max_map_count`). A thread started here has its stack and the stack's guard page
//!   only; an overflow still hits the guard page and the process dies of SIGSEGV, without
//!   the line naming the thread.
//! - [`trim`] gives back the stack pages a thread touched once and no longer uses. A
//!   thread's deepest moment (opening SQLite connections, taking a snapshot, setting up a
//!   compressor) touches a few tens of KiB of its stack, and those pages stay resident for
//!   as long as the thread lives, though an idle database never goes that deep again until
//!   its next write. [`trim`] hands the pages below the current frame back to the kernel
//!   before a thread goes to sleep; the next deep call gets fresh zeroed pages.

use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, PoisonError};

/// A thread started by [`spawn`]: join it for what its function returned.
pub struct LeanThread<T> {
    id: libc::pthread_t,
    /// Set once joined: a handle dropped before that detaches its thread.
    joined: bool,
    /// The function's result (or its panic), set as the thread's last act.
    result: Arc<Mutex<Option<std::thread::Result<T>>>>,
}

// SAFETY (for the two impls below): the handle is a pthread_t, a thread id, and a shared
// result slot behind a mutex; joining from another thread is what pthread_join is for.
// SAFETY: see above.
unsafe impl<T: Send> Send for LeanThread<T> {}
// SAFETY: see above.
unsafe impl<T: Send> Sync for LeanThread<T> {}

/// What the new thread runs: the caller's function, with the place to leave its result.
type Start = Box<dyn FnOnce() + Send>;

/// Start `f` on a new thread with a `stack_size`-byte stack (and the system's guard page),
/// named `name` where the system keeps thread names (Linux: its first 15 bytes).
pub fn spawn<T, F>(name: &str, stack_size: usize, f: F) -> io::Result<LeanThread<T>>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let result = Arc::new(Mutex::new(None));
    let slot = Arc::clone(&result);
    let name = thread_name(name);
    let start: Start = Box::new(move || {
        set_name(&name);
        let outcome = catch_unwind(AssertUnwindSafe(f));
        *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(outcome);
    });
    let start = Box::into_raw(Box::new(start));
    let stack_size = stack_size.max(libc::PTHREAD_STACK_MIN);
    // SAFETY: the attribute object is ours, initialised before use and destroyed after;
    // pthread_create gets a pointer to a live boxed closure that `run` takes ownership of
    // exactly once, or that is taken back here if the thread was not created.
    unsafe {
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        let rc = libc::pthread_attr_init(&mut attr);
        if rc != 0 {
            drop(Box::from_raw(start));
            return Err(io::Error::from_raw_os_error(rc));
        }
        let mut rc = libc::pthread_attr_setstacksize(&mut attr, stack_size);
        let mut id: libc::pthread_t = std::mem::zeroed();
        if rc == 0 {
            rc = libc::pthread_create(&mut id, &attr, run, start.cast());
        }
        libc::pthread_attr_destroy(&mut attr);
        if rc != 0 {
            drop(Box::from_raw(start));
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(LeanThread {
            id,
            joined: false,
            result,
        })
    }
}

extern "C" fn run(start: *mut libc::c_void) -> *mut libc::c_void {
    // SAFETY: `spawn` passed a `Box<Start>` it gave up; this is its only owner.
    let start = unsafe { Box::from_raw(start.cast::<Start>()) };
    // `start` catches its function's panic itself: nothing unwinds out of this frame.
    start();
    std::ptr::null_mut()
}

impl<T> LeanThread<T> {
    /// Whether the thread's function has returned (or panicked).
    pub fn is_finished(&self) -> bool {
        self.result
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    /// Wait for the thread to end; what its function returned, or its panic.
    pub fn join(mut self) -> std::thread::Result<T> {
        // SAFETY: `id` is a thread this handle started and nobody else joins or detaches
        // it: `join` takes the handle by value, and `joined` keeps Drop from detaching it.
        let rc = unsafe { libc::pthread_join(self.id, std::ptr::null_mut()) };
        self.joined = true;
        let outcome = self
            .result
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match outcome {
            Some(outcome) if rc == 0 => outcome,
            _ => Err(Box::new(format!("joining a thread failed (error {rc})"))),
        }
    }
}

impl<T> Drop for LeanThread<T> {
    fn drop(&mut self) {
        // A handle dropped unjoined leaves the thread to run on, detached (as std's does).
        if !self.joined {
            // SAFETY: the thread was neither joined nor detached: only `join` and this
            // drop use the id, each once.
            unsafe { libc::pthread_detach(self.id) };
        }
    }
}

fn thread_name(name: &str) -> Vec<u8> {
    let mut bytes: Vec<u8> = name.bytes().filter(|&b| b != 0).collect();
    #[cfg(target_os = "linux")]
    bytes.truncate(15);
    bytes.push(0);
    bytes
}

fn set_name(name: &[u8]) {
    #[cfg(target_os = "linux")]
    // SAFETY: `name` is NUL-terminated and at most 16 bytes with the NUL, as Linux asks.
    unsafe {
        libc::pthread_setname_np(libc::pthread_self(), name.as_ptr().cast());
    }
    #[cfg(not(target_os = "linux"))]
    let _ = name;
}

/// Bytes below `trim_linux`'s own frame left alone: its locals and the frames of the calls it
/// makes (the madvise wrapper's is a few bytes). A signal handler's frame needs no room here:
/// the kernel writes it only when the thread returns from madvise, after the pages are gone.
/// It was 4096, which kept a page below every idle thread's frames resident: 1024 leaves an
/// idle database's stack at two resident pages instead of three (measured with 50 idle
/// databases: 8 KiB a stack instead of 12-16, 4,584 KiB of RSS instead of 4,720).
#[cfg(target_os = "linux")]
const MARGIN: usize = 1024;

/// Release the resident pages of the calling thread's stack below its current frame (and
/// [`MARGIN`]). Those pages hold only frames of calls that have returned, so nothing refers
/// to them. Does nothing where the stack's bounds cannot be read, and on other systems.
pub fn trim() {
    #[cfg(target_os = "linux")]
    trim_linux();
}

/// Never inlined: `here` must be in this function's own frame, so that nothing of a caller's
/// frame lies below it (inlined into a large frame, the caller's live locals could sit more
/// than [`MARGIN`] below `here`, and would be zeroed).
#[cfg(target_os = "linux")]
#[inline(never)]
fn trim_linux() {
    let here = 0u8;
    let sp = std::ptr::addr_of!(here) as usize;
    // SAFETY: pthread_getattr_np fills the attribute object we own, which is destroyed
    // after use; pthread_attr_getstack only writes the two out-parameters. madvise with
    // MADV_DONTNEED is given a page-aligned range inside this thread's own stack mapping
    // and strictly below the live frames (the current one minus MARGIN): private anonymous
    // pages there read back as zeros the next time the stack grows into them.
    unsafe {
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        if libc::pthread_getattr_np(libc::pthread_self(), &mut attr) != 0 {
            return;
        }
        let mut base: *mut libc::c_void = std::ptr::null_mut();
        let mut size: libc::size_t = 0;
        let got = libc::pthread_attr_getstack(&attr, &mut base, &mut size);
        libc::pthread_attr_destroy(&mut attr);
        let page = match libc::sysconf(libc::_SC_PAGESIZE) {
            n if n > 0 => n as usize,
            _ => return,
        };
        let low = base as usize;
        if got != 0 || sp < low || sp >= low.saturating_add(size) {
            return;
        }
        // One page above the lowest address: a guard page may sit at the bottom.
        let from = (low + 2 * page - 1) & !(page - 1);
        let to = sp.saturating_sub(MARGIN) & !(page - 1);
        if to > from {
            libc::madvise(from as *mut libc::c_void, to - from, libc::MADV_DONTNEED);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_lean_thread_returns_its_result_and_reports_its_panic() {
        let thread = super::spawn("walsync-test", 128 * 1024, || 6 * 7).unwrap();
        assert_eq!(thread.join().unwrap(), 42);
        let thread =
            super::spawn("walsync-test", 128 * 1024, || -> u32 { panic!("boom") }).unwrap();
        let panic = thread.join().unwrap_err();
        assert_eq!(panic.downcast_ref::<&str>(), Some(&"boom"));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let thread = super::spawn("walsync-test", 128 * 1024, move || rx.recv().is_err()).unwrap();
        assert!(!thread.is_finished());
        drop(tx);
        assert!(thread.join().unwrap());
    }

    /// The point of `spawn`: a thread costs its stack and guard page, not also an
    /// alternate signal stack and its guard (two more memory maps a thread), which std
    /// gives the threads it starts.
    #[test]
    fn a_lean_thread_has_no_alternate_signal_stack() {
        fn alternate_stack_disabled() -> bool {
            // SAFETY: sigaltstack with a null new stack only reports the current one into
            // the struct we own.
            unsafe {
                let mut old: libc::stack_t = std::mem::zeroed();
                libc::sigaltstack(std::ptr::null(), &mut old) == 0
                    && old.ss_flags & libc::SS_DISABLE != 0
            }
        }
        let lean = super::spawn("walsync-test", 128 * 1024, alternate_stack_disabled);
        assert!(lean.unwrap().join().unwrap());
    }

    #[test]
    fn a_trimmed_stack_still_works_deep_down() {
        fn deep(n: u32) -> u64 {
            let buf = [n as u8; 512];
            if n == 0 {
                return u64::from(buf[0]);
            }
            deep(n - 1) + u64::from(buf[511])
        }
        let thread = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(|| {
                let first = deep(200);
                super::trim();
                let second = deep(200);
                super::trim();
                (first, second)
            })
            .unwrap();
        let (first, second) = thread.join().unwrap();
        assert_eq!(first, second);
        // And on a thread `spawn` started.
        let lean = super::spawn("walsync-test", 256 * 1024, || {
            let first = deep(200);
            super::trim();
            (first, deep(200))
        });
        let (first, second) = lean.unwrap().join().unwrap();
        assert_eq!(first, second);
    }
}

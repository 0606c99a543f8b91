//! Giving back the stack a thread touched once and no longer uses.
//!
//! `walsync watch` runs one thread per database. A thread's deepest moment (opening SQLite
//! connections, taking a snapshot, setting up a compressor) touches a few tens of KiB of its
//! stack, and those pages stay resident for as long as the thread lives, though an idle
//! database never goes that deep again until its next write. [`trim`] hands the pages below the current frame back
//! to the kernel before a thread goes to sleep; the next deep call gets fresh zeroed pages.

/// Bytes below the current frame left alone: the frames of the calls [`trim`] itself makes
/// (the madvise wrapper's is a few bytes). A signal handler's frame needs no room here: the
/// kernel writes it only when the thread returns from madvise, after the pages are gone.
#[cfg(target_os = "linux")]
const MARGIN: usize = 4096;

/// Release the resident pages of the calling thread's stack below its current frame (and
/// [`MARGIN`]). Those pages hold only frames of calls that have returned, so nothing refers
/// to them. Does nothing where the stack's bounds cannot be read, and on other systems.
pub fn trim() {
    #[cfg(target_os = "linux")]
    trim_linux();
}

#[cfg(target_os = "linux")]
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
    }
}

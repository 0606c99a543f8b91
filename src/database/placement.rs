//! Where SQLite's shared-memory mappings go in walsync's address space.
//!
//! Every open WAL database has its wal-index (`-shm`) mapped, 32 KiB per region. Linux
//! places each new mapping next to the last one made, top-down, so these file mappings end
//! up between the small anonymous mappings of the memory allocator and of thread stacks.
//! Two anonymous mappings side by side with the same protection are one entry in
//! `/proc/PID/maps`, one of the `vm.max_map_count` (65,530 by default) a process may have;
//! split by a `-shm` mapping they are two. Measured with 1000 idle databases: 3.45 memory
//! maps per database, of which 0.45 were the allocator's split this way.
//!
//! [`keep_shared_maps_apart`] asks SQLite's unix VFS to make its `mmap` calls through a
//! function of walsync's (`xSetSystemCall`, SQLite's own interface for this), which passes
//! an address *hint* for every shared mapping: the next free place in a region of its own,
//! far below where the kernel puts everything else. A hint is only a hint: where the place is
//! taken, the kernel chooses as before, so nothing can fail that did not fail before. The
//! regions of one wal-index then sit side by side in the file's order, and the kernel merges
//! them into one entry too.

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use rusqlite::ffi;

/// How far below the kernel's own placements the region starts: far enough that the
/// mappings of a process with many databases (a few GiB at most) never reach it.
const GAP: usize = 64 << 30;

/// The signature of SQLite's `mmap` system call.
type Mmap = unsafe extern "C" fn(
    *mut c_void,
    libc::size_t,
    c_int,
    c_int,
    c_int,
    libc::off_t,
) -> *mut c_void;

/// The `mmap` SQLite called before (normally libc's).
static PREVIOUS: OnceLock<Mmap> = OnceLock::new();

/// Where the region starts (0: no hints).
static BASE: AtomicUsize = AtomicUsize::new(0);

/// The next address to hint at (0: no hints).
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// The system's page size, which every hint is a multiple of.
static PAGE: AtomicUsize = AtomicUsize::new(4096);

/// Have SQLite's shared mappings placed side by side, away from other mappings (see the
/// module docs). Affects every SQLite connection of the process from then on; call it
/// before opening any, while the process has one thread (the CLI does, first thing).
/// Does nothing where it does not apply (not Linux, 32-bit, another default VFS) or when
/// called again.
pub fn keep_shared_maps_apart() {
    #[cfg(all(target_os = "linux", target_pointer_width = "64"))]
    // SAFETY: the calls are SQLite's documented VFS interface for system calls: `mmap` is
    // one of the unix VFS's overridable calls, `xGetSystemCall` returns the one in use and
    // `placed_mmap` has its exact signature and calls that one. The probe mapping is
    // unmapped before anything can use it.
    unsafe {
        if PREVIOUS.get().is_some() {
            return;
        }
        let vfs = ffi::sqlite3_vfs_find(std::ptr::null());
        if vfs.is_null()
            || (*vfs).iVersion < 3
            || (*vfs).zName.is_null()
            || std::ffi::CStr::from_ptr((*vfs).zName) != c"unix"
        {
            return;
        }
        let (Some(get), Some(set)) = ((*vfs).xGetSystemCall, (*vfs).xSetSystemCall) else {
            return;
        };
        let Some(previous) = get(vfs, c"mmap".as_ptr()) else {
            return;
        };
        let page = match usize::try_from(libc::sysconf(libc::_SC_PAGESIZE)) {
            Ok(page) if page.is_power_of_two() => page,
            _ => return,
        };
        let probe = libc::mmap(
            std::ptr::null_mut(),
            page,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if probe == libc::MAP_FAILED {
            return;
        }
        libc::munmap(probe, page);
        let Some(base) = (probe as usize).checked_sub(GAP) else {
            return;
        };
        let previous: Mmap = std::mem::transmute::<unsafe extern "C" fn(), Mmap>(previous);
        if PREVIOUS.set(previous).is_err() {
            return;
        }
        PAGE.store(page, Ordering::Relaxed);
        BASE.store(base & !(page - 1), Ordering::Relaxed);
        NEXT.store(base & !(page - 1), Ordering::Relaxed);
        let ours: unsafe extern "C" fn() =
            std::mem::transmute::<Mmap, unsafe extern "C" fn()>(placed_mmap);
        if set(vfs, c"mmap".as_ptr(), Some(ours)) != ffi::SQLITE_OK {
            NEXT.store(0, Ordering::Relaxed);
        }
    }
}

/// SQLite's `mmap`: a shared mapping with no address asked for gets the next place in the
/// region as a hint; everything else goes through unchanged.
///
/// # Safety
///
/// As `mmap(2)`: called by SQLite with its own arguments.
unsafe extern "C" fn placed_mmap(
    addr: *mut c_void,
    len: libc::size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    offset: libc::off_t,
) -> *mut c_void {
    let Some(previous) = PREVIOUS.get() else {
        return libc::mmap(addr, len, prot, flags, fd, offset);
    };
    let next = NEXT.load(Ordering::Relaxed);
    if !addr.is_null() || flags & libc::MAP_SHARED == 0 || next == 0 {
        return previous(addr, len, prot, flags, fd, offset);
    }
    let rounded = len.next_multiple_of(PAGE.load(Ordering::Relaxed));
    let hint = NEXT.fetch_add(rounded, Ordering::Relaxed);
    previous(hint as *mut c_void, len, prot, flags, fd, offset)
}

#[cfg(all(test, target_os = "linux", target_pointer_width = "64"))]
mod tests {
    use super::*;

    /// Where this process maps `path`, from `/proc/self/maps`: each mapping's start address.
    fn mappings_of(path: &std::path::Path) -> Vec<usize> {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let name = path.to_str().unwrap();
        maps.lines()
            .filter(|l| l.ends_with(name))
            .map(|l| usize::from_str_radix(l.split('-').next().unwrap(), 16).unwrap())
            .collect()
    }

    /// Once asked, a database's wal-index is mapped at a hinted place in the region, not
    /// among the process's other mappings; and the connection works as before.
    #[test]
    fn a_wal_index_is_mapped_in_a_region_of_its_own() {
        keep_shared_maps_apart();
        keep_shared_maps_apart(); // a second call changes nothing
        let base = BASE.load(Ordering::Relaxed);
        assert_ne!(base, 0, "the unix VFS's mmap was not taken over");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.db");
        let app = rusqlite::Connection::open(&path).unwrap();
        app.pragma_update(None, "journal_mode", "wal").unwrap();
        app.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
            .unwrap();
        let shm = dir.path().join("app.db-shm");
        let starts = mappings_of(&shm);
        assert!(!starts.is_empty(), "no mapping of {}", shm.display());
        let next = NEXT.load(Ordering::Relaxed);
        for start in starts {
            assert!(
                (base..next).contains(&start),
                "{start:#x} is outside the region {base:#x}..{next:#x}"
            );
        }
        let n: i64 = app
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
    }
}

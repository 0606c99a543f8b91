//! The host limits that bound how many databases one `walsync watch` can replicate, said at
//! start, before one is hit (issue 18).
//!
//! Each database costs a thread, a few descriptors, a few memory maps, and a watch on its
//! directory. A limit reached later shows up as an obscure error on one database ("unable to
//! open database file", a thread that cannot start), so `watch` compares what the databases
//! it found need with what the host allows, and says which limit, how many databases it
//! allows, and how to raise it. The costs are the measured ones for an idle database
//! (`scripts/bench.sh`, tenants phase), rounded up; the reserves cover the process's own.
//!
//! The limit on open files is also read and raised here: `watch` raises the soft limit to
//! the hard one at start, and a failure to open a file when the descriptors run out says
//! which limit it hit ([`crate::error`], [`crate::database`]).

/// Descriptors per idle database: SQLite's database, WAL and `-shm` files of the pin's
/// connection and, except on Linux, where a resting database lets it go, the sidecar lock.
/// A database that is writing or checkpointing holds a second connection and the lock for
/// a while (three more); one quiet for half a minute lets them go (see `Replica::rest`).
pub const FILES_PER_DATABASE: u64 = if cfg!(target_os = "linux") { 3 } else { 4 };
const FILES_RESERVED: u64 = 64;
/// Memory maps per database: its thread's stack and guard page, the `-shm` mapping, and
/// the allocator's maps of its heap (measured at 1000 and 3000 databases: 0.10 to 0.17 a
/// database with [`crate::keep_shared_maps_apart`], as the CLI runs, and half a map
/// without it), rounded up.
pub const MAPS_PER_DATABASE: u64 = 4;
const MAPS_RESERVED: u64 = 256;
const THREADS_RESERVED: u64 = 16;

/// One limit and what it allows.
#[derive(Debug, PartialEq, Eq)]
pub struct Limit {
    /// How it is named where it is set.
    pub what: &'static str,
    pub value: u64,
    /// How many databases fit under it.
    pub allows: u64,
    /// How to raise it.
    pub raise: &'static str,
}

impl Limit {
    fn new(what: &'static str, value: u64, per: u64, reserved: u64, raise: &'static str) -> Self {
        Limit {
            what,
            value,
            allows: value.saturating_sub(reserved) / per.max(1),
            raise,
        }
    }
}

/// The host's limits, as far as they can be read: `open_files` is RLIMIT_NOFILE (soft,
/// hard) once raised; `inotify` says whether directories are watched with inotify (one
/// watch per distinct directory).
pub fn host_limits(open_files: Option<(u64, u64)>, inotify: bool) -> Vec<Limit> {
    let mut limits = Vec::new();
    if let Some((soft, _)) = open_files {
        limits.push(Limit::new(
            "RLIMIT_NOFILE",
            soft,
            FILES_PER_DATABASE,
            FILES_RESERVED,
            "ulimit -n, or LimitNOFILE= under systemd",
        ));
    }
    if let Some(maps) = read_number("/proc/sys/vm/max_map_count") {
        limits.push(Limit::new(
            "vm.max_map_count",
            maps,
            MAPS_PER_DATABASE,
            MAPS_RESERVED,
            "sysctl -w vm.max_map_count=N",
        ));
    }
    if let Some(threads) = read_number("/proc/sys/kernel/threads-max") {
        limits.push(Limit::new(
            "kernel.threads-max",
            threads,
            1,
            THREADS_RESERVED,
            "sysctl -w kernel.threads-max=N",
        ));
    }
    if let Some(threads) = processes_limit() {
        limits.push(Limit::new(
            "RLIMIT_NPROC",
            threads,
            1,
            THREADS_RESERVED,
            "ulimit -u, or LimitNPROC= under systemd; it counts every thread of the user",
        ));
    }
    if inotify {
        if let Some(watches) = read_number("/proc/sys/fs/inotify/max_user_watches") {
            limits.push(Limit::new(
                "fs.inotify.max_user_watches",
                watches,
                1,
                0,
                "sysctl -w fs.inotify.max_user_watches=N, or --poll",
            ));
        }
    }
    limits
}

/// One warning for each limit `databases` databases (in `directories` distinct
/// directories) would pass.
pub fn warnings(limits: &[Limit], databases: u64, directories: u64) -> Vec<String> {
    limits
        .iter()
        .filter(|limit| {
            let count = if limit.what == "fs.inotify.max_user_watches" {
                directories
            } else {
                databases
            };
            count > limit.allows
        })
        .map(|limit| {
            let unit = if limit.what == "fs.inotify.max_user_watches" {
                "directories of databases"
            } else {
                "databases"
            };
            format!(
                "{} is {}, which allows about {} {unit}, for {databases} databases in \
                 {directories} directories: raise it ({})",
                limit.what, limit.value, limit.allows, limit.raise
            )
        })
        .collect()
}

/// This process's soft limit on open files (RLIMIT_NOFILE), if it can be read.
pub fn open_files_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes into the struct we own.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (rc == 0).then_some(rlim(limit.rlim_cur))
}

/// Raise this process's soft limit on open files to its hard limit (each watched database
/// keeps about six files open). Returns the soft and hard limits as they are afterwards.
pub fn raise_open_files_limit() -> Option<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return None;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    Some((rlim(limit.rlim_cur), rlim(limit.rlim_max)))
}

/// `rlim_t` is u64 on Linux and i64 on the BSDs (where infinity is -1, read as u64::MAX).
#[allow(clippy::unnecessary_cast)]
fn rlim(value: libc::rlim_t) -> u64 {
    value as u64
}

/// Whether this process has (nearly) all the files open that RLIMIT_NOFILE allows: SQLite
/// reports only "unable to open database file" then, so the caller can say which limit.
pub fn near_open_files_limit() -> bool {
    let (Some(limit), Ok(open)) = (open_files_limit(), std::fs::read_dir("/proc/self/fd")) else {
        return false;
    };
    open.count() as u64 + 8 >= limit
}

fn read_number(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// RLIMIT_NPROC's soft limit, unless unlimited.
fn processes_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes into the struct we own.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NPROC, &mut limit) };
    (rc == 0 && limit.rlim_cur != libc::RLIM_INFINITY).then_some(rlim(limit.rlim_cur))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_says_how_many_databases_it_allows_and_how_to_raise_it() {
        let limits = host_limits(Some((1024, 4096)), true);
        let files = &limits[0];
        assert_eq!(files.what, "RLIMIT_NOFILE");
        let allows = (1024 - 64) / FILES_PER_DATABASE;
        assert_eq!(files.allows, allows);
        assert!(warnings(&limits[..1], allows, allows).is_empty());
        let said = warnings(&limits[..1], allows + 1, 10);
        assert_eq!(said.len(), 1, "{said:?}");
        let expected = format!("RLIMIT_NOFILE is 1024, which allows about {allows} databases");
        assert!(said[0].contains(&expected), "{said:?}");
        assert!(said[0].contains("ulimit -n"), "{said:?}");
        let inotify = Limit::new("fs.inotify.max_user_watches", 100, 1, 0, "sysctl");
        assert!(warnings(std::slice::from_ref(&inotify), 1000, 100).is_empty());
        assert_eq!(warnings(&[inotify], 1000, 101).len(), 1);
    }
}

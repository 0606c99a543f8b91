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
//!
//! Resting databases fit the limit does not mean busy ones do: a database that starts,
//! writes or checkpoints holds more descriptors for a while. So the descriptors the
//! resting databases leave are a budget that busy databases take turns at ([`BUSY`]), and
//! a database for which there is no room at all is not opened ([`no_room_for_another`]).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::gate::Gate;

/// Descriptors per idle database: SQLite's database, WAL and `-shm` files of the pin's
/// connection and, except on Linux, where a resting database lets it go, the sidecar lock.
/// A busy one holds more for a while ([`FILES_WHILE_BUSY`]); one quiet for half a minute
/// (5 s while descriptors are short) lets them go (see `Replica::rest`).
pub const FILES_PER_DATABASE: u64 = if cfg!(target_os = "linux") { 3 } else { 4 };
/// The process's own descriptors, beyond its databases': its log, the watcher, the upload
/// workers' files and connections, and the snapshots in flight ([`crate::snapshot`] takes
/// four at a time, with a connection of three files each).
const FILES_RESERVED: u64 = 64;
/// Descriptors a busy database may hold beyond a resting one's [`FILES_PER_DATABASE`]: the
/// sidecar lock, a second connection (database, WAL, `-shm`), an object being staged,
/// state.json being replaced, and a connection to storage while it lists its replica.
pub const FILES_WHILE_BUSY: u64 = 7;
/// Memory maps per database: its thread's stack and guard page, the `-shm` mapping, and
/// the allocator's maps of its heap (measured at 1000 and 3000 databases: 0.10 to 0.17 a
/// database with [`crate::keep_shared_maps_apart`], as the CLI runs, and half a map
/// without it), rounded up.
pub const MAPS_PER_DATABASE: u64 = 4;
const MAPS_RESERVED: u64 = 256;
const THREADS_RESERVED: u64 = 16;

/// Databases this process replicates: each one holds [`FILES_PER_DATABASE`] descriptors at
/// rest, whatever it does.
static DATABASES: AtomicU64 = AtomicU64::new(0);

/// The descriptor budget's passes (issue 18). A database holds one while it may hold more
/// descriptors than a resting one: from before it is opened (or, once resting, before it
/// does anything again) until it rests on one connection without its sidecar lock. At most
/// [`busy_allowed`] hold one, so that RLIMIT_NOFILE covers every database at rest and
/// every busy one's extra. Without it, 4,000 databases starting at once under a limit of
/// 20,000 (room for 6,600 at rest) held five to seven descriptors each before any had
/// rested, and their threads then failed and retried on "too many open files" for minutes:
/// what they failed to write at the stop made the next start take 1,102 new snapshots; at
/// 6,000 databases, none settled at all.
pub static BUSY: Gate = Gate::computed(busy_allowed);

/// One database counted in the descriptor budget for as long as this lives.
pub struct Counted(());

impl Counted {
    pub fn new() -> Counted {
        DATABASES.fetch_add(1, Ordering::Relaxed);
        Counted(())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        DATABASES.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How many databases may be busy at once (see [`BUSY`]) under this process's soft
/// RLIMIT_NOFILE, with every database counted at rest.
pub fn busy_allowed() -> usize {
    busy_allowed_within(open_files_limit(), DATABASES.load(Ordering::Relaxed))
}

fn busy_allowed_within(limit: Option<u64>, databases: u64) -> usize {
    let Some(limit) = limit else {
        return usize::MAX;
    };
    let resting = databases
        .saturating_mul(FILES_PER_DATABASE)
        .saturating_add(FILES_RESERVED);
    let allowed = limit.saturating_sub(resting) / FILES_WHILE_BUSY;
    usize::try_from(allowed).unwrap_or(usize::MAX).max(1)
}

/// Why one more database cannot be opened, if RLIMIT_NOFILE leaves no room for it (busy)
/// beside every database at rest: it would only take its turn to fail on "too many open
/// files", after every other database found had waited for it.
pub fn no_room_for_another() -> Option<String> {
    let databases = DATABASES.load(Ordering::Relaxed);
    let limit = open_files_limit()?;
    (!room_within(limit, databases)).then(|| {
        format!(
            "RLIMIT_NOFILE is {limit}, which leaves no room for another database beside the \
             {databases} replicated (raise it: ulimit -n, or LimitNOFILE= under systemd)"
        )
    })
}

fn room_within(limit: u64, databases: u64) -> bool {
    let needed = (databases + 1)
        .saturating_mul(FILES_PER_DATABASE)
        .saturating_add(FILES_RESERVED + FILES_WHILE_BUSY);
    needed <= limit
}

/// Whether descriptors are short: not every database could be busy at once. A busy one
/// then gives its extra descriptors back sooner (see [`crate::replica::Replica::rest`]).
pub fn descriptors_short() -> bool {
    let databases = DATABASES.load(Ordering::Relaxed);
    (busy_allowed_within(open_files_limit(), databases) as u64) < databases
}

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
    fn busy_databases_share_what_resting_ones_leave_of_the_limit() {
        let left = 20_000 - FILES_RESERVED - 4_000 * FILES_PER_DATABASE;
        assert_eq!(
            busy_allowed_within(Some(20_000), 4_000) as u64,
            left / FILES_WHILE_BUSY
        );
        // More databases than fit at rest: one at a time still, never none.
        assert_eq!(busy_allowed_within(Some(20_000), 10_000), 1);
        assert_eq!(busy_allowed_within(None, 10_000), usize::MAX);
        assert!(busy_allowed_within(Some(u64::MAX), 10_000) > 1 << 40);
    }

    #[test]
    fn another_database_fits_while_it_could_be_busy_beside_the_others_at_rest() {
        let limit = 20_000;
        let fits = (limit - FILES_RESERVED - FILES_WHILE_BUSY) / FILES_PER_DATABASE;
        assert!(room_within(limit, fits - 1));
        assert!(!room_within(limit, fits));
        assert!(room_within(u64::MAX, u64::MAX / 2));
    }

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

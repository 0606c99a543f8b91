//! Who holds a sidecar: the stamp a walsync writes into the sidecar's `lock` file when it
//! takes the lock, and whether the process a stamp names is still alive.
//!
//! Why a stamp as well as the lock: on Linux, a database that rests lets go of the lock (see
//! [`super::Sidecar::release_lock`]), which saves one descriptor per idle database. The lock
//! then no longer tells a second walsync that this one is replicating the database, and it
//! no longer tells this one, when it takes the lock back, whether anybody else held it
//! meanwhile. The stamp tells both:
//!
//! - one line, `walsync-holder pid=P start=S boot=B dev=D ino=I n=N`: the process (its pid,
//!   and its start time in clock ticks since boot, which a later process given the same pid
//!   does not share), the boot it runs in (`/proc/sys/kernel/random/boot_id`), the lock
//!   file it was written into (device and inode, so that a copy of the sidecar, `cp -a`,
//!   does not count), and a number unique in that process (two replicas opened one after
//!   the other in one process have different stamps);
//! - written by whoever takes the lock, before anything else, and never fsynced: the stamp
//!   only matters while its writer lives, and a crash that loses it ends the writer too;
//! - a holder is *alive* if its stamp names this lock file, this boot and a process that
//!   runs now with the same start time (or, for this very process, a sidecar it still has
//!   open). A stamp that cannot be read or parsed, or names a dead process, another boot (a
//!   reboot, a VM rolled back and booted again) or another file names nobody.
//!
//! Only Linux can tell whether another process is alive (`/proc`); elsewhere the lock is
//! never released, so the lock alone decides, as it always did.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// The first word of every stamp (and the format's version, should it ever change).
const MAGIC: &str = "walsync-holder";

/// Stamps this process wrote whose sidecar is still open, by their `n`.
static OPEN_HERE: Mutex<BTreeSet<u64>> = Mutex::new(BTreeSet::new());

/// The next `n`.
static NEXT: AtomicU64 = AtomicU64::new(1);

/// A stamp this process wrote: kept in [`OPEN_HERE`] until dropped.
#[derive(Debug)]
pub(super) struct Stamp {
    pub(super) text: String,
    /// The lock file's device and inode.
    pub(super) lock: (u64, u64),
    n: u64,
}

impl Stamp {
    /// A new stamp for the lock file `lock` (its device and inode), counted as open in this
    /// process.
    pub(super) fn new(lock: (u64, u64)) -> Stamp {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let me = std::process::id();
        let text = format!(
            "{MAGIC} pid={me} start={} boot={} dev={} ino={} n={n}\n",
            own_start_time().unwrap_or(0),
            boot_id().unwrap_or_default(),
            lock.0,
            lock.1
        );
        if let Ok(mut open) = OPEN_HERE.lock() {
            open.insert(n);
        }
        Stamp { text, lock, n }
    }
}

impl Drop for Stamp {
    fn drop(&mut self) {
        if let Ok(mut open) = OPEN_HERE.lock() {
            open.remove(&self.n);
        }
    }
}

/// The pid of the live walsync whose stamp `content` is, read from the lock file `lock`;
/// `None` if it names nobody alive (see the module docs).
pub(super) fn live_holder(content: &[u8], lock: (u64, u64)) -> Option<u32> {
    let text = std::str::from_utf8(content).ok()?.trim_end();
    let mut words = text.split(' ');
    if words.next()? != MAGIC {
        return None;
    }
    let mut field = |name: &str| {
        let word = words.next()?;
        word.strip_prefix(name)?
            .strip_prefix('=')
            .map(str::to_string)
    };
    let pid: u32 = field("pid")?.parse().ok()?;
    let start: u64 = field("start")?.parse().ok()?;
    let boot = field("boot")?;
    let dev: u64 = field("dev")?.parse().ok()?;
    let ino: u64 = field("ino")?.parse().ok()?;
    let n: u64 = field("n")?.parse().ok()?;
    if (dev, ino) != lock || boot.is_empty() || Some(boot.as_str()) != boot_id() {
        return None;
    }
    let alive = if pid == std::process::id() {
        OPEN_HERE.lock().is_ok_and(|open| open.contains(&n))
    } else {
        start != 0 && start_time(pid) == Some(start)
    };
    alive.then_some(pid)
}

/// The boot this machine runs in, if the system says (Linux); read once per process, as
/// it cannot change while the process runs (each database stamps its sidecar as it
/// opens, and the read showed in a profile of a restart of 4,000: 1% of the thread that
/// opens them).
fn boot_id() -> Option<&'static str> {
    static BOOT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    BOOT.get_or_init(|| {
        let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        Some(id.trim().to_string()).filter(|id| !id.is_empty() && !id.contains(' '))
    })
    .as_deref()
}

/// When this process started (see [`start_time`]), read once per process: the kernel
/// answers `/proc/PID/stat` by adding up the CPU time of every thread of the process, and
/// each database stamps its sidecar as it opens. With a thread per database that read grew
/// with the databases (`do_task_stat` showed in a profile of a restart of 4,000).
fn own_start_time() -> Option<u64> {
    static OWN: std::sync::OnceLock<(u32, Option<u64>)> = std::sync::OnceLock::new();
    let me = std::process::id();
    match OWN.get_or_init(|| (me, start_time(me))) {
        (pid, start) if *pid == me => *start,
        _ => start_time(me), // a child forked since: its own
    }
}

/// When process `pid` started, in clock ticks since boot (field 22 of `/proc/PID/stat`), if
/// it runs now.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, field 2, is in parentheses and may hold spaces: count after it.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_names_its_writer_while_its_sidecar_is_open() {
        let lock = (7, 42);
        let stamp = Stamp::new(lock);
        assert_eq!(
            live_holder(stamp.text.as_bytes(), lock),
            Some(std::process::id())
        );
        // Another file (a copy of the sidecar) is not held by it.
        assert_eq!(live_holder(stamp.text.as_bytes(), (7, 43)), None);
        let text = stamp.text.clone();
        drop(stamp);
        assert_eq!(live_holder(text.as_bytes(), lock), None);
    }

    #[test]
    fn another_live_process_is_a_holder_and_a_dead_one_is_not() {
        let lock = (1, 2);
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let start = start_time(pid).unwrap();
        let boot = boot_id().unwrap();
        let stamp = |start: u64, boot: &str| {
            format!("{MAGIC} pid={pid} start={start} boot={boot} dev=1 ino=2 n=1\n")
        };
        assert_eq!(live_holder(stamp(start, boot).as_bytes(), lock), Some(pid));
        // The same pid with another start time is another process.
        assert_eq!(live_holder(stamp(start + 1, boot).as_bytes(), lock), None);
        // Another boot: the machine restarted (or a VM was rolled back and booted again).
        assert_eq!(
            live_holder(stamp(start, "other-boot").as_bytes(), lock),
            None
        );
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(live_holder(stamp(start, boot).as_bytes(), lock), None);
    }

    #[test]
    fn an_empty_or_garbled_stamp_names_nobody() {
        let lock = (1, 2);
        for content in [
            &b""[..],
            b"\0\0\0",
            b"walsync-holder pid=1",
            b"pid=1 start=2",
        ] {
            assert_eq!(live_holder(content, lock), None);
        }
    }
}

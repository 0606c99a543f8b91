//! Tests that need root: to make a directory immutable (`chattr +i`, which root cannot write
//! past either, unlike permission bits), or to give a file to another user. CI runs as
//! root, so there they run; elsewhere a test that needs root starts with
//! [`needs_root!`](needs_root), which skips it, loudly: a plain `cargo test` as another user
//! passes, and says on its terminal which tests it did not run and why. Under CI (the `CI`
//! variable set, as `.ci/run` has it) a test that needs root fails instead: a CI that is not
//! root by mistake must not pass by skipping.

use std::io::Write as _;

/// Whether this process runs as root (effective user id 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid(2) takes nothing and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Say that the running test skipped something, and why. Straight to the process's stderr:
/// the test harness keeps what `println!` and `eprintln!` print for failing tests only, and a
/// skip must be seen in a run that passes.
pub fn say_skipped(what: &str) {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a test");
    let _ = writeln!(std::io::stderr(), "{test}: skipped: {what}");
}

/// Return from the calling test unless it runs as root, saying `skipped: needs root (WHY)`:
/// `needs_root!("chattr +i makes the sidecar unwritable")`.
macro_rules! needs_root {
    ($why:expr) => {
        if !$crate::common::root::is_root() {
            assert!(
                std::env::var_os("CI").is_none(),
                "needs root ({}), and CI must run every test: run it as root",
                $why
            );
            $crate::common::root::say_skipped(&format!("needs root ({})", $why));
            return;
        }
    };
}
pub(crate) use needs_root;

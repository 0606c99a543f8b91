//! Signals for `walsync watch`, and the `--exec` child it supervises.
//!
//! walsync takes its signals synchronously: SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2 (and
//! SIGCHLD and SIGQUIT with `--exec`) are blocked in every thread from the start and taken
//! with `sigwait` by the main thread. SIGTERM and SIGINT stop walsync (after shipping what
//! is committed); SIGHUP, SIGUSR1 and SIGUSR2, which supervisors send routinely (`sv hup`,
//! `sv 1`, `s6-svc -h`), are logged and otherwise change nothing: by default they would
//! kill walsync at once, shipping nothing. With `--exec`, all but SIGCHLD are forwarded.
//!
//! An `--exec` application must get its signals as if walsync were not there:
//! - it starts with an empty signal mask and default dispositions (a child inherits both
//!   across fork and exec, and walsync's mask blocks the very signals it must receive);
//! - a command without shell syntax is executed directly (split on whitespace), so the
//!   signal walsync forwards reaches the application itself, not a shell that dies and
//!   leaves it orphaned; a command with shell syntax runs through `/bin/sh -c` in a process
//!   group of its own, and signals go to the whole group;
//! - a SIGINT the terminal sent (Ctrl-C) already reached a directly executed child, which
//!   shares walsync's process group: on Linux, where `sigwaitinfo` tells, it is not sent
//!   again.
//!
//! walsync then waits for the child, ships what is left, and exits with its status.

use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command, ExitStatus};

use walsync::{Error, Result};

/// The signals walsync takes itself: every thread blocks them (see [`block_signals`]).
pub struct Signals(libc::sigset_t);

/// Block SIGTERM, SIGINT, SIGHUP, SIGUSR1 and SIGUSR2 (and, with `child_too`, SIGCHLD to
/// notice an `--exec` child's exit and SIGQUIT to forward it) in this thread and every
/// thread started after, so that [`Signals::wait`] can take them synchronously. A blocked
/// SIGCHLD stays pending until taken, so a child that exits before the wait starts is not
/// missed. Must run before any thread starts.
pub fn block_signals(child_too: bool) -> Signals {
    // SAFETY: plain libc calls on a sigset_t we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in [
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGHUP,
            libc::SIGUSR1,
            libc::SIGUSR2,
        ] {
            libc::sigaddset(&mut set, signal);
        }
        if child_too {
            libc::sigaddset(&mut set, libc::SIGCHLD);
            libc::sigaddset(&mut set, libc::SIGQUIT);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        Signals(set)
    }
}

impl Signals {
    /// Wait until one of the blocked signals arrives; returns its number.
    pub fn wait(&self) -> libc::c_int {
        self.wait_with_origin().0
    }

    /// Wait until one of the blocked signals arrives; returns its number, and whether the
    /// kernel sent it to walsync's whole process group from a terminal (Ctrl-C): then a
    /// child in that group got it too.
    #[cfg(target_os = "linux")]
    fn wait_with_origin(&self) -> (libc::c_int, bool) {
        loop {
            // SAFETY: siginfo_t is a plain C struct, for which all zero bytes are valid.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: the set is initialised and its signals are blocked in every thread;
            // `info` is ours and written by the call.
            let signal = unsafe { libc::sigwaitinfo(&self.0, &mut info) };
            if signal > 0 {
                return (signal, info.si_code == libc::SI_KERNEL);
            }
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn wait_with_origin(&self) -> (libc::c_int, bool) {
        let mut signal: libc::c_int = 0;
        // SAFETY: the set is initialised and its signals are blocked in every thread.
        while unsafe { libc::sigwait(&self.0, &mut signal) } != 0 {}
        (signal, false)
    }

    /// Wait for SIGTERM or SIGINT (a stop); the others are logged and waited past.
    pub fn wait_for_stop(&self) -> libc::c_int {
        loop {
            let signal = self.wait();
            if matches!(signal, libc::SIGTERM | libc::SIGINT) {
                return signal;
            }
            log::info!(
                "{}: nothing to do; replication goes on (SIGTERM or SIGINT stops walsync)",
                signal_name(signal)
            );
        }
    }
}

pub fn signal_name(signal: libc::c_int) -> &'static str {
    match signal {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGCHLD => "SIGCHLD",
        _ => "a signal",
    }
}

/// The `--exec` command's exit status as walsync's own: its code, or 128 + the signal that
/// killed it, as shells report it.
pub fn child_exit_code(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(signal)) => (128 + signal).clamp(0, 255) as u8,
        (None, None) => 1,
    }
}

/// Characters that make a command shell syntax (quotes, expansions, redirections,
/// operators, assignments, comments, globs): such a command runs through `/bin/sh -c`.
const SHELL_SYNTAX: &[char] = &[
    '|', '&', ';', '<', '>', '(', ')', '$', '`', '\\', '"', '\'', '*', '?', '[', ']', '#', '~',
    '=', '%', '{', '}', '!', '\n',
];

/// How a command is started: its words executed directly, or a shell.
#[derive(Debug, PartialEq)]
enum Launch<'a> {
    Direct(Vec<&'a str>),
    Shell,
}

fn launch_of(command: &str) -> Launch<'_> {
    if command.contains(SHELL_SYNTAX) {
        return Launch::Shell;
    }
    let words: Vec<&str> = command.split_whitespace().collect();
    // The shell keywords and built-ins people put first (`exec app`, `cd dir && ...` has
    // syntax already) need the shell too.
    match words.first() {
        None => Launch::Shell,
        Some(first) if ["exec", "cd", "export", "set", ".", "eval"].contains(first) => {
            Launch::Shell
        }
        Some(_) => Launch::Direct(words),
    }
}

/// A running `--exec` command.
pub struct Supervised {
    child: Child,
    /// The child leads a process group of its own (the shell case): signal the group.
    group: bool,
}

impl Supervised {
    /// Start `command` with walsync's environment, stdin, stdout and stderr, an empty
    /// signal mask and default signal dispositions.
    pub fn start(command: &str) -> Result<Supervised> {
        let (mut cmd, group) = match launch_of(command) {
            Launch::Direct(words) => {
                let mut cmd = Command::new(words[0]);
                cmd.args(&words[1..]);
                (cmd, false)
            }
            Launch::Shell => {
                let mut cmd = Command::new("/bin/sh");
                cmd.arg("-c").arg(command).process_group(0);
                (cmd, true)
            }
        };
        // SAFETY: the hook runs in the child between fork and exec, and calls only
        // async-signal-safe functions (sigemptyset, sigaction, sigprocmask) on its own
        // stack memory.
        unsafe {
            cmd.pre_exec(|| {
                reset_signals();
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| Error::from(e).with_context(format!("starting --exec {command:?}")))?;
        log::info!(
            "started --exec command (pid {}{})",
            child.id(),
            if group {
                ", through /bin/sh -c in its own process group"
            } else {
                ""
            }
        );
        Ok(Supervised { child, group })
    }

    /// Forward signals from `signals` to the child until it exits; returns its status.
    pub fn wait(mut self, signals: &Signals) -> Result<ExitStatus> {
        let pid = self.child.id() as libc::pid_t;
        let target = if self.group { -pid } else { pid };
        loop {
            // SIGCHLD first: the child may have exited before the wait began.
            if let Some(status) = self
                .child
                .try_wait()
                .map_err(|e| Error::from(e).with_context("waiting for the --exec command"))?
            {
                return Ok(status);
            }
            let (signal, from_terminal) = signals.wait_with_origin();
            if signal == libc::SIGCHLD {
                continue;
            }
            if from_terminal && !self.group {
                // Ctrl-C at a terminal: the child shares walsync's process group and got
                // it already; a second one could cut its shutdown short.
                log::info!(
                    "{} from the terminal: the --exec command got it too",
                    signal_name(signal)
                );
                continue;
            }
            log::info!(
                "{}: forwarding it to the --exec command ({} {pid})",
                signal_name(signal),
                if self.group { "process group" } else { "pid" }
            );
            // SAFETY: kill(2) on our own child (or its group), not yet reaped, so the pid
            // is still ours.
            unsafe {
                libc::kill(target, signal);
            }
        }
    }
}

/// In a freshly forked child: default dispositions for every signal and an empty mask.
/// (Handled signals reset to default at exec anyway; ignored ones and the mask would not.)
fn reset_signals() {
    // SAFETY: async-signal-safe calls on local memory; invalid signal numbers (32 and 33
    // are glibc's, SIGKILL and SIGSTOP cannot be changed) merely fail.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = libc::SIG_DFL;
        libc::sigemptyset(&mut action.sa_mask);
        for signal in 1..65 {
            if signal != libc::SIGKILL && signal != libc::SIGSTOP {
                libc::sigaction(signal, &action, std::ptr::null_mut());
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_commands_run_directly_and_shell_syntax_through_sh() {
        assert_eq!(
            launch_of("myapp --db /data/app.db"),
            Launch::Direct(vec!["myapp", "--db", "/data/app.db"])
        );
        assert_eq!(
            launch_of("  sleep   30 "),
            Launch::Direct(vec!["sleep", "30"])
        );
        for shell in [
            "exec myapp",
            "a && b",
            "trap 'x' TERM; wait",
            "FOO=1 app",
            "app > log",
            "app $HOME",
            "app ~/db",
            "app *.db",
            "",
        ] {
            assert_eq!(launch_of(shell), Launch::Shell, "{shell:?}");
        }
    }
}

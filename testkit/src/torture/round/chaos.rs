//! The lifecycle chaos of a round: the events of real hosts that hid bugs before, each a
//! `chaos_*` step that [`Round::play`] runs at least once per round, with the variant the
//! round's [`Plan`](crate::torture::Plan) picks: walsync stopped while the application
//! rewrites the WAL, the database replaced by rename, the host rolled back, the data
//! directory copied, storage down at start, the sidecar immutable or full, a slow S3, and
//! the wall clock stepped (libfaketime). Each step's doc says what it hunts.
//!
//! Apart from the round's plumbing (`round.rs`) because each step is a small scenario of
//! its own, read one at a time.

use std::io::Read as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use walsync::storage::Storage;
use walsync::UtcTime;

use super::{Round, NAME, PREFIX};
use crate::torture::app::{open_checkpointer, prepare_replacement, with_suffix, Writer};
use crate::torture::host::{DiskImage, Frozen};
use crate::torture::{sleep_ms, wait_at_most, AppAction, SidecarFault, Stop, Totals};

impl Round<'_> {
    /// Stop walsync (SIGTERM or SIGKILL) while the application commits; then the
    /// application closes every connection (the last close checkpoints the WAL into the
    /// database file and deletes it: the writer thread really closes its connection and
    /// reopens it afterwards) or runs `PRAGMA wal_checkpoint(TRUNCATE)`; it commits a little
    /// more, and walsync starts again (after a TRUNCATE, in `p == 1` rounds, under a
    /// stepped-back clock).
    ///
    /// Hunts restarts that trust a saved tip the WAL no longer backs: commits that went
    /// into the database file while nobody watched must start a new generation (or be
    /// proven absent), never be skipped, and no index may be cut again from a WAL that was
    /// rewritten (a fork in the chain).
    pub(super) fn chaos_stop_then_app_rewrites_wal(
        &mut self,
        stop: Stop,
        app: AppAction,
        writer: &Writer,
        totals: &mut Totals,
    ) -> Result<(), String> {
        sleep_ms(self.rng.range(50, 300));
        match stop {
            Stop::Term => {
                totals.stops_sigterm += 1;
                if self.watch.is_some() {
                    self.wait_until_watching(totals)?;
                    match self.terminate()? {
                        Some(status) if status.success() => {}
                        outcome => totals.failures.push(format!(
                            "round {}: SIGTERM while the application commits: walsync {}; see {}",
                            self.round,
                            match outcome {
                                Some(status) => format!("exited with {status}"),
                                None => "did not exit within 90 s".to_string(),
                            },
                            self.log.display()
                        )),
                    }
                }
            }
            Stop::Kill => {
                totals.stops_sigkill += 1;
                totals.kills += 1;
                self.kill_watch();
            }
        }
        // The writer keeps committing while nobody watches.
        sleep_ms(self.rng.range(20, 200));
        match app {
            AppAction::CloseAll => {
                totals.app_closes += 1;
                let paused = writer.pause()?;
                self.checkpointer = None;
                if !with_suffix(&self.db, "-wal").exists() {
                    totals.wal_deleted += 1;
                }
                drop(paused);
                self.checkpointer = Some(open_checkpointer(&self.db)?);
            }
            AppAction::Truncate => {
                // The writer holds the write lock for a moment now and then: try again.
                for _ in 0..50 {
                    if self.app_checkpoint("TRUNCATE")? {
                        totals.app_truncates += 1;
                        break;
                    }
                    sleep_ms(10);
                }
            }
        }
        // More commits into the rewritten (or new) WAL before walsync looks again.
        sleep_ms(self.rng.range(50, 300));
        if app == AppAction::Truncate && !self.plan.clock_step_after_replacement {
            self.start_next_under_stepped_clock(totals);
        }
        self.start_watch(totals)?;
        self.let_stepped_clock_start_generation(totals)
    }

    /// Replace the database by rename while walsync watches it: a changed copy of it
    /// (`VACUUM INTO`, then more changes) or a fresh database, prepared aside. The
    /// application closes its connections, removes the old `-wal` and `-shm` (as an
    /// application swapping files does) and renames the new file into place, then reopens
    /// it; the recorded states continue from the new file's. In rounds with a short
    /// `--snapshot-interval` the application stays quiet past the interval first, so that a
    /// snapshot is due at the swap. In `p == 0` rounds walsync is SIGKILLed right after the
    /// rename and started under a stepped-back clock.
    ///
    /// Hunts: the new file's pages filed under the old generation (a restore mixing two
    /// databases), a due snapshot taken through the old file's pinned connection, the old
    /// WAL's frames shipped against the new file, and (with the clock step) a new generation
    /// sorting before the old one.
    pub(super) fn chaos_replace_database(
        &mut self,
        writer: &Writer,
        totals: &mut Totals,
    ) -> Result<(), String> {
        // Beside the database: a rename does not cross filesystems.
        let replacement = self
            .db
            .with_file_name(format!("replacement-{}.db", totals.replacements));
        let fresh = self.plan.fresh_replacement;
        prepare_replacement(&self.db, &replacement, fresh, &mut self.rng)?;
        let paused = writer.pause()?;
        self.checkpointer = None;
        if let Some(interval) = self.plan.snapshot_interval {
            let ms = (interval * 1000.0) as u64;
            sleep_ms(self.rng.range(ms, ms + 300));
            totals.replacements_snapshot_due += 1;
        }
        for suffix in ["-wal", "-shm"] {
            match std::fs::remove_file(with_suffix(&self.db, suffix)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("removing the old {suffix}: {e}")),
            }
        }
        std::fs::rename(&replacement, &self.db)
            .map_err(|e| format!("renaming the replacement: {e}"))?;
        totals.replacements += 1;
        if fresh {
            totals.fresh_replacements += 1;
        }
        if self.plan.clock_step_after_replacement {
            self.kill_watch();
            totals.kills += 1;
            self.start_next_under_stepped_clock(totals);
            self.start_watch(totals)?;
            self.let_stepped_clock_start_generation(totals)?;
        }
        drop(paused);
        self.checkpointer = Some(open_checkpointer(&self.db)?);
        Ok(())
    }

    /// Roll the host back, as restoring a VM or filesystem snapshot does: walsync and the
    /// application stopped as by a power cut, an image of the database, its WAL, its
    /// `-shm` and the sidecar taken; then more commits, replicated for a second or two; then
    /// everything stopped again and the image put back in place (same inodes, the old
    /// modification times), while storage keeps what was uploaded meanwhile. The
    /// application reopens the rolled-back database (its state is recorded as a switch) and
    /// walsync starts on it with its clock ahead (`p == 0`) or behind (`p == 1`).
    ///
    /// Hunts: indexes cut again over the abandoned history (two histories in one
    /// generation, caught by the chain check), a new generation sorting before the
    /// abandoned one (the latest restore would be the abandoned future), and the name
    /// refused to its own host.
    pub(super) fn chaos_rollback(
        &mut self,
        writer: &Writer,
        totals: &mut Totals,
    ) -> Result<(), String> {
        let paused = writer.pause()?;
        self.checkpointer = None;
        self.kill_watch();
        totals.kills += 1;
        let files = [
            self.db.clone(),
            with_suffix(&self.db, "-wal"),
            with_suffix(&self.db, "-shm"),
        ];
        let image = DiskImage::take(&files, &self.sidecar_root())?;
        drop(paused);
        self.checkpointer = Some(open_checkpointer(&self.db)?);
        self.start_watch(totals)?;
        // The future that is undone.
        sleep_ms(self.rng.range(800, 2000));
        let paused = writer.pause()?;
        self.checkpointer = None;
        self.kill_watch();
        totals.kills += 1;
        image.put_back()?;
        totals.rollbacks += 1;
        drop(paused);
        self.checkpointer = Some(open_checkpointer(&self.db)?);
        if self.plan.clock_step_after_replacement {
            self.start_next_with_clock_ahead(totals);
        } else {
            self.start_next_under_stepped_clock(totals);
        }
        self.start_watch(totals)?;
        self.let_stepped_clock_start_generation(totals)
    }

    /// Make the next walsync start run with its wall clock ahead (libfaketime), as a host
    /// whose clock runs fast. Its object times are later than its commits, which a
    /// point-in-time restore tolerates (it lags), and the labels must come back to the
    /// clock afterwards. The S3 server refuses requests signed more than 15 minutes off,
    /// so walsync must sign with the server's time.
    fn start_next_with_clock_ahead(&mut self, totals: &mut Totals) {
        if self.faketime.is_none() {
            totals.skip("clock ahead: libfaketime.so.1 not found (apt-get install faketime)");
            return;
        }
        self.next_start_clock = Some(format!("+{}m", self.rng.range(20, 50)));
        totals.clock_ahead += 1;
    }

    /// Copy the data directory as an operator would (`cp -a` of the database, its WAL and
    /// `-shm`, and the sidecar, while everything runs) and watch the copy with the same
    /// destination and name: walsync must refuse it at start (its saved position belongs
    /// to the original; `state.json` names the original) before uploading anything, while
    /// the original goes on (the final restores check that it still owns the name).
    ///
    /// Hunts: a copy that takes the name over (a newer generation of staging data, the
    /// original refused at its next start).
    pub(super) fn chaos_copy(&mut self, totals: &mut Totals) -> Result<(), String> {
        // Only a state.json naming the original tells the copy apart (walsync writes it
        // after each stored snapshot); under heavy faults there may be none yet.
        // Storage must answer the copy's walsync (below) for a refusal to be possible.
        self.set_server(true);
        let storage = self.server.storage(PREFIX);
        let deadline = Instant::now() + Duration::from_secs(15);
        while storage
            .get(&format!("{NAME}/state.json"), &mut Vec::new())
            .is_err()
        {
            if Instant::now() > deadline {
                totals.copies_skipped += 1;
                return Ok(());
            }
            sleep_ms(200);
        }
        let copy_dir = self.dir.join(format!("copy-{}", totals.copies_refused));
        std::fs::create_dir(&copy_dir)
            .map_err(|e| format!("creating the copy's directory: {e}"))?;
        let mut sources: Vec<PathBuf> = vec![self.db.clone(), self.sidecar_root()];
        sources.extend(
            ["-wal", "-shm"]
                .map(|s| with_suffix(&self.db, s))
                .into_iter()
                .filter(|p| p.exists()),
        );
        let copied = Command::new("cp")
            .arg("-a")
            .args(&sources)
            .arg(&copy_dir)
            .status()
            .map_err(|e| format!("cp -a: {e}"))?;
        if !copied.success() {
            // A file vanished under cp (the WAL deleted by a close): try again next time.
            totals.copies_skipped += 1;
            let _ = std::fs::remove_dir_all(&copy_dir);
            return Ok(());
        }
        let copy = copy_dir.join(NAME).with_extension("db");
        let dest = self.dest();
        // Straight to the server, not through the fault proxy: the refusal needs an answer.
        let mut cmd = self.command(&["watch", &copy.to_string_lossy(), "-b", &dest]);
        let mut child = cmd
            .envs(self.server.env())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting walsync on the copy: {e}"))?;
        let status = wait_at_most(&mut child, Duration::from_secs(30))?;
        let mut stderr = String::new();
        if let Some(mut err) = child.stderr.take() {
            let _ = err.read_to_string(&mut stderr);
        }
        let _ = std::fs::remove_dir_all(&copy_dir);
        match status {
            Some(status) if !status.success() && stderr.contains("another walsync writes") => {
                totals.copies_refused += 1;
            }
            outcome => totals.failures.push(format!(
                "round {}: a copy of the data directory watched under the same name was not \
                 refused ({}): {}",
                self.round,
                outcome.map_or("still running after 30 s".to_string(), |s| s.to_string()),
                stderr.lines().last().unwrap_or("")
            )),
        }
        Ok(())
    }

    /// Start walsync while storage is down (the network not up yet, the store restarting):
    /// it must start, stage locally and upload once storage is back, not exit (a restart
    /// loop under a supervisor).
    pub(super) fn chaos_storage_down_at_start(
        &mut self,
        totals: &mut Totals,
    ) -> Result<(), String> {
        self.kill_watch();
        totals.kills += 1;
        self.set_server(false);
        self.start_watch(totals)?;
        totals.starts_storage_down += 1;
        sleep_ms(self.rng.range(2500, 4000));
        if let Some(child) = self.watch.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                self.watch = None;
                self.watch_gone();
                totals.failures.push(format!(
                    "round {}: walsync exited ({status}) when started with storage down; see {}",
                    self.round,
                    self.log.display()
                ));
                self.start_watch(totals)?;
            }
        }
        self.set_server(true);
        Ok(())
    }

    /// Make the sidecar unwritable for a while, with a SIGKILL and a restart in between:
    /// immutable (`chattr +i` on `.app.db-walsync/` and the replica's directory: nothing can
    /// be created, renamed or removed there) in `p == 0` rounds, full (the round's tmpfs
    /// under it filled up: ENOSPC) in `p == 1` rounds. Always undone, also on a panic.
    ///
    /// Hunts: a tip saved past what is really staged, an object uploaded whose staging
    /// failed (or a staged object dropped before it is stored), a checkpoint over frames
    /// that are not staged, and a walsync that exits, spins or blocks the application
    /// instead of waiting loudly and resuming when the disk recovers, also across a restart.
    pub(super) fn chaos_sidecar_fault(&mut self, totals: &mut Totals) -> Result<(), String> {
        let root = self.sidecar_root();
        let filler = root.join("filler");
        match self.plan.sidecar {
            SidecarFault::Immutable => {
                let mut dirs = vec![root.clone()];
                if let Ok(entries) = std::fs::read_dir(&root) {
                    dirs.extend(
                        entries
                            .flatten()
                            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                            .map(|e| e.path()),
                    );
                }
                match Frozen::freeze(dirs) {
                    Ok(frozen) => self.frozen = Some(frozen),
                    Err(e) => {
                        totals.skip(&format!("sidecar made immutable: {e}"));
                        return Ok(());
                    }
                }
                totals.sidecar_frozen += 1;
            }
            SidecarFault::Full => {
                let Some(tmpfs) = &self.tmpfs else {
                    return Ok(()); // skipped, said when the mount failed
                };
                tmpfs.fill(&filler)?;
                totals.sidecar_full += 1;
            }
        }
        sleep_ms(self.rng.range(200, 700));
        self.kill_watch();
        totals.kills += 1;
        sleep_ms(self.rng.range(0, 300));
        self.start_watch(totals)?;
        sleep_ms(self.rng.range(200, 700));
        self.frozen = None;
        match std::fs::remove_file(&filler) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("removing {}: {e}", filler.display())),
        }
        Ok(())
    }

    /// A slow S3: every request held by the proxy for 0.5-1.8 s (or 3 s, past
    /// `--s3-timeout`, so that requests time out and are retried) for 1.5-2.5 s, while the
    /// application commits.
    ///
    /// Hunts the write lock held across network I/O (Litestream #724, #1332): the
    /// application's commits would wait on S3, and with its 5 s busy timeout fail with
    /// SQLITE_BUSY, which fails the round (the slowest commit is reported too); and
    /// uploads that time out and are then lost or stored twice.
    pub(super) fn chaos_slow_s3(&mut self, totals: &mut Totals) {
        let delay = if self.rng.chance(0.3) {
            3000
        } else {
            self.rng.range(500, 1800)
        };
        self.proxy.set_delay(Duration::from_millis(delay));
        totals.slow_s3 += 1;
        sleep_ms(self.rng.range(1500, 2500));
        self.proxy.set_delay(Duration::ZERO);
    }

    /// Make the next walsync start run under a wall clock stepped back by the plan's offset
    /// (libfaketime), right after a change that forces a new generation (a replacement, or
    /// a stop followed by the application's TRUNCATE). Points in time from then on are only
    /// checked to be some recorded state (object times cannot say when their commits
    /// happened while the clock is wrong); the latest restore must still be the newest state.
    ///
    /// Hunts generations and objects named by a clock that went back: a generation that
    /// sorts before older ones would make the latest restore silently pick an old history.
    fn start_next_under_stepped_clock(&mut self, totals: &mut Totals) {
        if self.faketime.is_none() {
            totals
                .skip("clock stepped back: libfaketime.so.1 not found (apt-get install faketime)");
            return;
        }
        // Objects of a walsync under the stepped clock are named just after the newest
        // object staged so far (walsync holds object times through a step back of up to an
        // hour), or by the stepped clock itself after a larger step back (a clock that ran
        // ahead before, see `Replica::next_time`): from then on, object times no longer
        // bound commit times.
        let staged_until = self.staged_until().unwrap_or(UtcTime::from_millis(0));
        let minutes: i64 = self
            .plan
            .clock_step
            .trim_start_matches('-')
            .trim_end_matches('m')
            .parse()
            .unwrap_or(0);
        let stepped_now = UtcTime::from_millis(UtcTime::now().millis() - minutes * 60_000);
        let labels_follow_the_clock = staged_until.millis() - stepped_now.millis() > 3_600_000;
        let from = if labels_follow_the_clock {
            stepped_now
        } else {
            staged_until
        };
        if self.clock_stepped_at.is_none_or(|t| from < t) {
            self.clock_stepped_at = Some(from);
        }
        self.next_start_clock = Some(self.plan.clock_step.clone());
    }

    /// If the current walsync runs under a stepped clock, give it (10 s at most) the time
    /// to start its generation, so that the next chaos does not kill it first.
    fn let_stepped_clock_start_generation(&mut self, totals: &mut Totals) -> Result<(), String> {
        if !self.clock_stepped_watch {
            return Ok(());
        }
        self.wait_until_watching(totals)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && self.watch.is_some() {
            let log = std::fs::read(&self.log).unwrap_or_default();
            let ours = log.get(self.log_start as usize..).unwrap_or_default();
            if String::from_utf8_lossy(ours).contains(" generation") {
                break;
            }
            sleep_ms(20);
        }
        Ok(())
    }

    /// The time of the newest object staged so far (`time_ms` in the sidecar's
    /// `position.json`; see `src/replica/position.rs`).
    fn staged_until(&self) -> Option<UtcTime> {
        for entry in std::fs::read_dir(self.sidecar_root()).ok()?.flatten() {
            let Ok(text) = std::fs::read_to_string(entry.path().join("position.json")) else {
                continue;
            };
            let value: serde_json::Value = serde_json::from_str(&text).ok()?;
            return value["time_ms"].as_i64().map(UtcTime::from_millis);
        }
        None
    }

    /// From walsync's log: the errors the sidecar faults caused, and the generations
    /// started by walsyncs under a stepped clock (in their parts of the log).
    pub(super) fn scan_log(&mut self, totals: &mut Totals) {
        let log = std::fs::read(&self.log).unwrap_or_default();
        totals.sidecar_errors_logged += String::from_utf8_lossy(&log)
            .lines()
            .filter(|l| {
                l.contains("No space left on device") || l.contains("Operation not permitted")
            })
            .count() as u64;
        for &(from, to) in &self.clock_stepped_logs {
            let part = log
                .get(from as usize..(to as usize).min(log.len()))
                .unwrap_or_default();
            totals.clock_step_generations += String::from_utf8_lossy(part)
                .lines()
                .filter(|l| {
                    l.contains("starting a new generation")
                        || l.contains("starting the first generation")
                })
                .count() as u64;
        }
    }
}

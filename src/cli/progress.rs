//! A progress line on stderr for the one-shot commands (`walsync restore`, `walsync
//! snapshot`): bytes and objects done, rewritten in place with `\r` at most a few times a
//! second. Off unless the command line turns it on ([`enable`]), which it does only when
//! stderr is a terminal; the library's own callers (`watch`, an embedding application)
//! never see it. Process-wide: the storage wrapper ([`Counted`]) and a snapshot's
//! [`Terminal`] reporter write to the same line.

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use walsync::storage::{ObjectInfo, Storage};
use walsync::Result;

/// At most this often is the line redrawn.
const REDRAW: Duration = Duration::from_millis(250);

static ENABLED: AtomicBool = AtomicBool::new(false);
static BYTES: AtomicU64 = AtomicU64::new(0);
static OBJECTS: AtomicU64 = AtomicU64::new(0);

struct Line {
    label: &'static str,
    phase: &'static str,
    drawn: Option<Instant>,
    width: usize,
}

static LINE: Mutex<Line> = Mutex::new(Line {
    label: "",
    phase: "",
    drawn: None,
    width: 0,
});

/// True when file descriptor 2 is a terminal.
pub fn stderr_is_terminal() -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(2) == 1 }
}

/// Show progress for the command `label` (e.g. "restore") from now on.
pub fn enable(label: &'static str) {
    if let Ok(mut line) = LINE.lock() {
        line.label = label;
    }
    ENABLED.store(true, Ordering::Relaxed);
}

/// Enter a phase ("downloading", "copying", ...): unless it is the current one, its byte
/// and object counts start at zero.
pub fn phase(name: &'static str) {
    if !ENABLED.load(Ordering::Relaxed) {
        return;
    }
    if let Ok(mut line) = LINE.lock() {
        if line.phase == name {
            return;
        }
        BYTES.store(0, Ordering::Relaxed);
        OBJECTS.store(0, Ordering::Relaxed);
        line.phase = name;
        line.drawn = None;
    }
    draw(false);
}

/// `n` more bytes done.
pub fn bytes(n: u64) {
    if ENABLED.load(Ordering::Relaxed) {
        BYTES.fetch_add(n, Ordering::Relaxed);
        draw(false);
    }
}

/// The phase has done `n` bytes in all.
pub fn set_bytes(n: u64) {
    if ENABLED.load(Ordering::Relaxed) {
        BYTES.store(n, Ordering::Relaxed);
        draw(false);
    }
}

/// A snapshot's progress (its copy and its compression), shown on the line.
pub struct Terminal;

impl walsync::Progress for Terminal {
    fn phase(&self, name: &'static str) {
        phase(name);
    }

    fn set_bytes(&self, bytes: u64) {
        set_bytes(bytes);
    }
}

/// One more object (a snapshot or segment) stored or downloaded.
pub fn object() {
    if ENABLED.load(Ordering::Relaxed) {
        OBJECTS.fetch_add(1, Ordering::Relaxed);
        draw(false);
    }
}

/// Draw the final state and end the line (so later messages start on their own line).
pub fn finish() {
    if ENABLED.swap(false, Ordering::Relaxed) {
        draw(true);
        eprintln!();
    }
}

fn draw(force: bool) {
    // Another thread drawing right now is as good as drawing.
    let Ok(mut line) = LINE.try_lock() else {
        return;
    };
    if !force && line.drawn.is_some_and(|t| t.elapsed() < REDRAW) {
        return;
    }
    line.drawn = Some(Instant::now());
    let text = format!(
        "walsync {}: {} {:.1} MiB, {} objects",
        line.label,
        line.phase,
        BYTES.load(Ordering::Relaxed) as f64 / (1024.0 * 1024.0),
        OBJECTS.load(Ordering::Relaxed)
    );
    // Pad over the remains of a longer previous line.
    let pad = line.width.saturating_sub(text.len());
    line.width = text.len();
    let mut err = std::io::stderr().lock();
    let _ = write!(err, "\r{text}{:pad$}", "");
    let _ = err.flush();
}

/// Where log lines go (the logger's target): stderr, after wiping a progress line shown
/// there, so that the message starts at the left edge; the next update redraws the line.
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if ENABLED.load(Ordering::Relaxed) {
            if let Ok(mut line) = LINE.lock() {
                if line.width > 0 {
                    let mut err = std::io::stderr().lock();
                    write!(err, "\r{:width$}\r", "", width = line.width)?;
                    line.width = 0;
                    line.drawn = None;
                }
            }
        }
        std::io::stderr().lock().write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// A writer that counts what passes through it as progress.
struct Writer<'a>(&'a mut dyn Write);

impl Write for Writer<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.0.write(buf)?;
        bytes(n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Storage that reports downloads (as they go) and uploaded files (once stored) as
/// progress, in the phases "downloading" and "uploading".
pub struct Counted(pub Arc<dyn Storage>);

impl Storage for Counted {
    fn put_bytes(&self, key: &str, data: &[u8]) -> Result<()> {
        self.0.put_bytes(key, data)
    }

    fn put_file(&self, key: &str, file: &File) -> Result<()> {
        phase("uploading");
        self.0.put_file(key, file)?;
        bytes(file.metadata().map_or(0, |m| m.len()));
        object();
        Ok(())
    }

    fn get(&self, key: &str, out: &mut dyn Write) -> Result<u64> {
        phase("downloading");
        let n = self.0.get(key, &mut Writer(out))?;
        object();
        Ok(n)
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        self.0.list(prefix)
    }

    fn delete(&self, key: &str) -> Result<()> {
        self.0.delete(key)
    }

    // Forwarded, not left to the trait's defaults: those would turn one batched DeleteObjects
    // into a DELETE per key, and skip the abort of crashed uploads.
    fn delete_many(&self, keys: &[String]) -> Result<()> {
        self.0.delete_many(keys)
    }

    fn abort_stale_uploads(&self, prefix: &str) -> Result<usize> {
        self.0.abort_stale_uploads(prefix)
    }

    fn describe(&self) -> String {
        self.0.describe()
    }
}

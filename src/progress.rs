//! What a long one-shot operation tells whoever watches it: today a snapshot's two phases,
//! copying the database through the backup API and compressing the copy, with the bytes
//! each has done. The library only reports, through [`Progress`]; drawing is the caller's
//! (the `walsync` binary draws a line on a terminal). A replica reports to nobody unless
//! [`crate::Replica::set_progress`] gives it someone.

/// Receives the progress of a [`crate::Replica`]'s snapshot. Called from the thread that
/// takes it, so each call should be cheap (an atomic store, a redraw now and then).
pub trait Progress: Send + Sync {
    /// A new phase starts ("copying", "compressing"); its byte count starts at zero.
    fn phase(&self, name: &'static str);
    /// The current phase has done `bytes` bytes in all.
    fn set_bytes(&self, bytes: u64);
}

/// Nobody watching.
pub(crate) struct Unwatched;

impl Progress for Unwatched {
    fn phase(&self, _name: &'static str) {}
    fn set_bytes(&self, _bytes: u64) {}
}

/// A reader that reports the bytes that passed through it so far as the phase's progress.
pub(crate) struct Reader<'a, R> {
    pub inner: R,
    pub progress: &'a dyn Progress,
    pub done: u64,
}

impl<R: std::io::Read> std::io::Read for Reader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        self.progress.set_bytes(self.done);
        Ok(n)
    }
}

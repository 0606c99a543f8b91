//! One error type for the whole crate.
//!
//! Every error carries a human-readable message that already names what was being done
//! (which database, which object, which operation), built up with [`Context::context`] as it
//! travels outwards, so the CLI can print it as a single line. The [`ErrorKind`] lets callers
//! decide what to do without parsing text: retry a transient storage failure, report a missing
//! object, refuse corrupt data.
//!
//! Messages must never contain credentials: requests are signed in headers, which no message
//! quotes; storage code formats URLs without their query string, removes the secret parts of
//! a server's answer precisely, and never prints keys.

use std::fmt;

/// What went wrong, coarsely, so callers can choose between retrying and giving up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The caller asked for something impossible: a bad argument, a bad name, a missing file.
    Invalid,
    /// An object or file that should exist does not.
    NotFound,
    /// Storage refused our credentials or signature (403, wrong secret key, expired token).
    Auth,
    /// Data failed verification: bad gzip CRC, bad WAL checksum, a gap in segment indexes.
    Corrupt,
    /// A failure that may succeed if tried again: 5xx, 429, connection reset, timeout.
    Transient,
    /// A local I/O failure (disk full, permission denied, ...).
    Io,
    /// SQLite reported an error.
    Sqlite,
    /// Anything else.
    Other,
}

/// An error with a kind and a one-line message that includes its context, and, when a
/// storage server answered, its HTTP status and S3 error code, so that callers match on data
/// rather than on message text.
#[derive(Clone, Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    http_status: Option<u16>,
    s3_code: Option<String>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            message: message.into(),
            http_status: None,
            s3_code: None,
        }
    }

    /// Record what the storage server answered: its HTTP status and S3 error code (the
    /// `<Code>` of its error document; empty when it sent none).
    pub fn with_response(mut self, http_status: u16, s3_code: &str) -> Error {
        self.http_status = Some(http_status);
        self.s3_code = (!s3_code.is_empty()).then(|| s3_code.to_string());
        self
    }

    /// The HTTP status of the storage server's answer, when this error is one.
    pub fn http_status(&self) -> Option<u16> {
        self.http_status
    }

    /// The S3 error code (`NoSuchBucket`, `SlowDown`, ...), when the server sent one.
    pub fn s3_code(&self) -> Option<&str> {
        self.s3_code.as_deref()
    }

    pub fn invalid(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Invalid, message)
    }

    pub fn corrupt(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Corrupt, message)
    }

    pub fn not_found(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::NotFound, message)
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// True when trying the same operation again may succeed.
    pub fn is_transient(&self) -> bool {
        self.kind == ErrorKind::Transient
    }

    /// Prefix the message with what was being done: `"{what}: {message}"`.
    pub fn with_context(mut self, what: impl fmt::Display) -> Error {
        self.message = format!("{what}: {}", self.message);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(err: std::io::Error) -> Error {
        let kind = match err.kind() {
            std::io::ErrorKind::NotFound => ErrorKind::NotFound,
            std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof => {
                ErrorKind::Corrupt
            }
            _ => ErrorKind::Io,
        };
        // Name the limit that was hit, not just "Too many open files".
        let message = match err.raw_os_error() {
            Some(libc::EMFILE) => crate::limits::open_files_limit().map_or_else(
                || "too many open files (RLIMIT_NOFILE)".to_string(),
                |limit| format!("too many open files (RLIMIT_NOFILE soft limit {limit})"),
            ),
            Some(libc::ENFILE) => {
                "too many open files in the whole system (the fs.file-max sysctl)".to_string()
            }
            _ => err.to_string(),
        };
        Error::new(kind, message)
    }
}

impl From<rusqlite::Error> for Error {
    fn from(err: rusqlite::Error) -> Error {
        Error::new(ErrorKind::Sqlite, err.to_string())
    }
}

impl From<serde_json::Error> for Error {
    fn from(err: serde_json::Error) -> Error {
        Error::new(ErrorKind::Corrupt, err.to_string())
    }
}

/// Adds context to any result whose error converts into [`Error`].
pub trait Context<T> {
    /// Prefix the error message with `what()`, evaluated only on error.
    fn context<D: fmt::Display>(self, what: impl FnOnce() -> D) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn context<D: fmt::Display>(self, what: impl FnOnce() -> D) -> Result<T> {
        self.map_err(|e| e.into().with_context(what()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_out_of_file_descriptors_names_the_limit() {
        let err = Error::from(std::io::Error::from_raw_os_error(libc::EMFILE));
        let limit = crate::limits::open_files_limit().unwrap();
        assert_eq!(
            err.to_string(),
            format!("too many open files (RLIMIT_NOFILE soft limit {limit})")
        );
        let err = Error::from(std::io::Error::from_raw_os_error(libc::ENFILE));
        assert!(err.to_string().contains("fs.file-max"), "{err}");
    }

    #[test]
    fn context_prefixes_message_and_keeps_kind() {
        let r: std::result::Result<(), std::io::Error> = Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no such file",
        ));
        let err = r.context(|| "opening app.db").unwrap_err();
        assert_eq!(err.to_string(), "opening app.db: no such file");
        assert_eq!(err.kind(), ErrorKind::NotFound);
    }

    #[test]
    fn the_server_answer_survives_context_and_clone() {
        let err = Error::new(ErrorKind::NotFound, "GET a/b: not found")
            .with_response(404, "NoSuchBucket")
            .with_context("restoring app");
        let copy = err.clone();
        assert_eq!(copy.http_status(), Some(404));
        assert_eq!(copy.s3_code(), Some("NoSuchBucket"));
        let bare = Error::new(ErrorKind::Transient, "x").with_response(503, "");
        assert_eq!((bare.http_status(), bare.s3_code()), (Some(503), None));
    }
}

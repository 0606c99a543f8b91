//! walsync: continuous replication of SQLite WAL databases to S3-compatible storage.
//!
//! The modules follow the shape of the program:
//!
//! - [`wal`]: the SQLite WAL file format: read and validate frames, write standalone WALs.
//! - [`storage`]: the storage client behind one narrow trait (S3 and `file://`).
//! - [`layout`]: how objects are named in a replica (the public, scriptable contract).
//! - [`database`]: opening the SQLite database walsync replicates, and pinning its WAL.
//! - [`snapshot`]: consistent compressed copies of a database through the backup API.
//! - [`segment`]: cutting committed WAL frames into standalone compressed segments.
//! - [`sidecar`]: walsync's files beside a database: lock, position, staged objects.
//! - [`replica`]: one database replicated to one destination: generations, staging, checkpoints.
//! - [`watcher`]: file events (inotify, kqueue, or polling) that wake a database's thread.
//! - [`stack`]: giving back thread stack pages an idle database no longer uses.
//! - [`uploader`]: the small pool of blocking upload workers shared by all databases.
//! - [`replicator`]: continuous replication of many databases (`walsync watch`).
//! - [`restore`]: planning, downloading, verifying and applying a replica to a file.
//! - [`list`]: what a destination holds, for people and scripts.

pub mod database;
pub mod error;
pub mod layout;
pub mod list;
pub mod replica;
pub mod replicator;
pub mod restore;
pub mod segment;
pub mod sidecar;
pub mod snapshot;
pub mod spool;
pub mod stack;
pub mod storage;
pub mod uploader;
pub mod utc;
pub mod wal;
pub mod watcher;

pub use error::{Error, ErrorKind, Result};

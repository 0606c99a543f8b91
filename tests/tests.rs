//! walsync's integration tests, as one test binary (as ripgrep does): the shared helpers in
//! `common/` are compiled once, and every module can use any of them without `dead_code`
//! allowances. Each module drives the real `walsync` binary or library against real SQLite
//! databases and a real S3 server (s3s-fs, SigV4 checked) that the tests start themselves.
//! That server, the fault proxy and the torture harness are the test kit's
//! (`walsync_testkit`, `testkit/` in the repository), which the tools in `scripts/` use too;
//! `common/` keeps what only this binary can have: the path of the `walsync` it was built
//! with, and its one logger.
//!
//! Run one module with `cargo test --test tests durability::` (or any name filter). The larger
//! modules keep their rooms in a directory beside them (`storage.rs` and `storage/`), so
//! `storage::` still runs every storage test, and `storage::credentials::` one room of them.

mod common;

mod bad_input;
mod cli;
mod cli_rules;
mod crash_recovery;
mod directories;
mod durability;
mod example_app;
mod ops;
mod readme;
mod reconcile;
mod retention;
mod secrets;
mod service;
mod signals;
mod snapshot_restore;
mod storage;
mod torture;
mod watch;

//! Helpers only this test binary can have (the S3 server, the fault proxy and the torture
//! harness are the test kit's, `walsync_testkit`): fixtures that run the `walsync` binary
//! built with these tests, the process's one logger, and the skipping of tests that need
//! root where they cannot have it.

pub mod fixtures;
pub mod logs;
pub mod root;

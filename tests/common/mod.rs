//! Helpers only this test binary can have (the S3 server, the fault proxy and the torture
//! harness are the test kit's, `walsync_testkit`): fixtures that run the `walsync` binary
//! built with these tests, and the process's one logger.

pub mod fixtures;
pub mod logs;

//! Operations features of the real binary: `watch --metrics-addr` (Prometheus text),
//! `watch --heartbeat-url` (only while every database's lag is under a bound), the lag
//! itself whatever holds commits back, progress output of `restore` and `snapshot` (only
//! on a terminal), timestamped log lines, and `walsync help COMMAND` (every flag
//! documented, one rule for prune).
//!
//! One room a theme (`cargo test --test tests ops::` runs them all): `metrics` (and the
//! strict parser of the exposition format the others scrape with), `heartbeat` (and the
//! lag it is bound by, and the monitoring settings refused), `output` (progress, log
//! lines, `-v`) and `help`.

mod heartbeat;
mod help;
mod metrics;
mod output;

use std::net::{SocketAddr, TcpListener};
use std::path::Path;

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A free port on 127.0.0.1 (bound and released: another process could take it, but
/// nothing else in these tests picks ports this way).
fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

//! The fault vocabulary shared by the test S3 server and the fault proxy.
//!
//! One [`FaultMix`] names the probability of each fault per request. The proxy
//! (`faultproxy.rs`) plays its TCP part (resets, stalls) and the S3 server (`s3server.rs`) its
//! HTTP part (500 InternalError, 503 SlowDown, truncated bodies); each treats the other part
//! as "pass", so both can be given the same mix and a mix of one kind plays that kind at its
//! rate. Each counts what it did in a [`FaultCounts`]; add the two for the whole picture.

/// Probabilities (each 0..=1, summing to at most 1) of each fault per request; the rest
/// passes through.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FaultMix {
    /// TCP (the proxy): reset the connection.
    pub reset: f64,
    /// HTTP (the server): answer `500 InternalError`.
    pub error500: f64,
    /// HTTP (the server): answer `503 SlowDown`.
    pub slowdown503: f64,
    /// TCP (the proxy): hold the connection without answering.
    pub stall: f64,
    /// HTTP (the server): cut the response body short and break the connection.
    pub truncate: f64,
}

/// One fault a [`FaultMix`] can pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Pass,
    Reset,
    Error500,
    SlowDown503,
    Stall,
    Truncate,
}

impl FaultMix {
    /// No faults: everything passes.
    pub fn none() -> FaultMix {
        FaultMix::default()
    }

    /// The fault for a request, given `x` uniform in `0..1`. Both the proxy and the server
    /// draw from the whole mix, so each plays its kinds at the rates the mix gives.
    pub fn pick(&self, x: f64) -> Fault {
        let mut x = x;
        for (p, fault) in [
            (self.reset, Fault::Reset),
            (self.error500, Fault::Error500),
            (self.slowdown503, Fault::SlowDown503),
            (self.stall, Fault::Stall),
            (self.truncate, Fault::Truncate),
        ] {
            if x < p {
                return fault;
            }
            x -= p;
        }
        Fault::Pass
    }
}

/// What the proxy or the server did, by kind; [`FaultCounts::add`] sums them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// Requests the server served as they were (counted by the server only; the proxy may
    /// still have reset or stalled the answer on its way back).
    pub passed: u64,
    pub resets: u64,
    pub errors500: u64,
    pub slowdowns503: u64,
    pub stalls: u64,
    pub truncations: u64,
    /// Connections the proxy dropped because the server was down (not an injected fault).
    pub upstream_down: u64,
}

impl FaultCounts {
    /// Faults injected on purpose (not counting passes or a stopped server).
    pub fn injected(&self) -> u64 {
        self.resets + self.errors500 + self.slowdowns503 + self.stalls + self.truncations
    }

    pub fn add(&mut self, other: &FaultCounts) {
        self.passed += other.passed;
        self.resets += other.resets;
        self.errors500 += other.errors500;
        self.slowdowns503 += other.slowdowns503;
        self.stalls += other.stalls;
        self.truncations += other.truncations;
        self.upstream_down += other.upstream_down;
    }
}

impl std::fmt::Display for FaultCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "reset {} / 500 {} / 503 SlowDown {} / stall {} / truncated {} (passed {}, server down {})",
            self.resets,
            self.errors500,
            self.slowdowns503,
            self.stalls,
            self.truncations,
            self.passed,
            self.upstream_down
        )
    }
}

/// A small seeded generator that threads can share.
#[derive(Default)]
pub struct SharedRng(std::sync::Mutex<u64>);

impl SharedRng {
    pub fn new(seed: u64) -> SharedRng {
        SharedRng(std::sync::Mutex::new(seed))
    }

    pub fn next(&self) -> u64 {
        splitmix64(&mut self.0.lock().unwrap())
    }

    /// Uniform in `0..1`.
    pub fn fraction(&self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// splitmix64: a small, good, seedable generator.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

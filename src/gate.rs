//! A gate that lets a few threads through at a time.
//!
//! A host of ten thousand databases starts ten thousand threads at once, and each one's
//! first act is a request to storage (reconciling its replica). Unbounded, that is ten
//! thousand connections at once, each with its buffers: hundreds of MiB of peak memory for
//! work that a few connections finish as fast, and a burst a real S3 would throttle. The
//! gate bounds how many threads do such work at the same moment; the others wait their
//! turn, which comes within milliseconds.

use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

pub struct Gate {
    inside: Mutex<usize>,
    turn: Condvar,
    limit: Limit,
}

/// How many a gate lets through: a fixed number, or one computed at each entry (for a
/// bound that moves with what the process holds, as the descriptor budget does).
enum Limit {
    Fixed(usize),
    Computed(fn() -> usize),
}

/// A place inside the gate, given back when dropped.
pub struct Pass<'a> {
    gate: &'a Gate,
}

impl Gate {
    pub const fn new(limit: usize) -> Gate {
        Gate {
            inside: Mutex::new(0),
            turn: Condvar::new(),
            limit: Limit::Fixed(limit),
        }
    }

    /// A gate whose limit `limit` computes afresh at each entry. A limit that grows wakes
    /// nobody: use [`Gate::enter_within`], whose waiters look again when their wait ends.
    pub const fn computed(limit: fn() -> usize) -> Gate {
        Gate {
            inside: Mutex::new(0),
            turn: Condvar::new(),
            limit: Limit::Computed(limit),
        }
    }

    /// How many it lets through now (at least one).
    fn limit(&self) -> usize {
        match self.limit {
            Limit::Fixed(n) => n,
            Limit::Computed(f) => f(),
        }
        .max(1)
    }

    /// Whether every place is taken now (a hint: it may change at once).
    pub fn is_full(&self) -> bool {
        *self.inside.lock().unwrap_or_else(PoisonError::into_inner) >= self.limit()
    }

    /// Wait up to `wait` for a place; `None` if none came. A thread that must stay
    /// responsive (to a stop) waits a little at a time.
    pub fn enter_within(&self, wait: Duration) -> Option<Pass<'_>> {
        let deadline = Instant::now() + wait;
        let mut inside = self.inside.lock().unwrap_or_else(PoisonError::into_inner);
        while *inside >= self.limit() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            inside = self
                .turn
                .wait_timeout(inside, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        *inside += 1;
        Some(Pass { gate: self })
    }

    /// Wait for a place, and hold it until the [`Pass`] is dropped.
    pub fn enter(&self) -> Pass<'_> {
        let mut inside = self.inside.lock().unwrap_or_else(PoisonError::into_inner);
        while *inside >= self.limit() {
            inside = self
                .turn
                .wait(inside)
                .unwrap_or_else(PoisonError::into_inner);
        }
        *inside += 1;
        Pass { gate: self }
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        let mut inside = self
            .gate
            .inside
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *inside -= 1;
        drop(inside);
        self.gate.turn.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::Gate;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn no_more_than_the_limit_are_inside_at_once() {
        let gate = Arc::new(Gate::new(3));
        let (inside, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let (gate, inside, most) = (gate.clone(), inside.clone(), most.clone());
                std::thread::spawn(move || {
                    let _pass = gate.enter();
                    let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    // Stay until the gate has been seen full (a fixed few ms alone, a loaded
                    // machine can spend starting the next thread), or give up.
                    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(5);
                    while most.load(Ordering::SeqCst) < 3 && std::time::Instant::now() < give_up {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    // And a moment more, for a gate that lets too many in to show it.
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    inside.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(most.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_computed_limit_is_read_at_each_entry() {
        static LIMIT: AtomicUsize = AtomicUsize::new(1);
        let gate = Gate::computed(|| LIMIT.load(Ordering::SeqCst));
        let wait = std::time::Duration::from_millis(20);
        let first = gate.enter_within(wait).expect("one is let through");
        assert!(gate.enter_within(wait).is_none());
        LIMIT.store(2, Ordering::SeqCst);
        let second = gate.enter_within(wait).expect("the limit grew to two");
        LIMIT.store(0, Ordering::SeqCst); // read as one: never none at all
        drop((first, second));
        let _third = gate.enter_within(wait).expect("one is always let through");
        assert!(gate.enter_within(wait).is_none());
    }

    #[test]
    fn a_full_gate_turns_away_after_the_wait() {
        let gate = Gate::new(1);
        let pass = gate.enter();
        assert!(gate
            .enter_within(std::time::Duration::from_millis(20))
            .is_none());
        drop(pass);
        assert!(gate
            .enter_within(std::time::Duration::from_millis(20))
            .is_some());
    }
}

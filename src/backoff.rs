//! Exponential backoff: the one rule for waiting between retries. The S3 client retries a
//! request a few times with short, jittered waits; the upload pool retries an upload for as
//! long as it takes with waits growing to a minute. Both double from a first wait up to a
//! maximum.

use std::time::Duration;

/// Waits that double from `first` up to `max`.
#[derive(Clone, Debug)]
pub struct Backoff {
    next: Duration,
    first: Duration,
    max: Duration,
}

impl Backoff {
    pub const fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            next: first,
            first,
            max,
        }
    }

    /// The wait before the next try; each call doubles the one after, up to the maximum.
    pub fn next_wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        wait
    }

    /// [`Backoff::next_wait`] with "equal jitter": between half of it and all of it, so
    /// that clients that failed together do not all retry together.
    pub fn next_jittered(&mut self) -> Duration {
        let wait = self.next_wait();
        wait / 2 + wait.mul_f64(random_fraction() / 2.0)
    }

    /// Start again from the first wait.
    pub fn restart(&mut self) {
        self.next = self.first;
    }
}

/// A random number in [0, 1), good enough for jitter, without a dependency.
pub fn random_fraction() -> f64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let bits = RandomState::new().build_hasher().finish();
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_maximum_and_restart() {
        let ms = Duration::from_millis;
        let mut backoff = Backoff::new(ms(200), ms(1000));
        let waits: Vec<Duration> = (0..5).map(|_| backoff.next_wait()).collect();
        assert_eq!(waits, [ms(200), ms(400), ms(800), ms(1000), ms(1000)]);
        backoff.restart();
        assert_eq!(backoff.next_wait(), ms(200));
        let jittered = backoff.next_jittered();
        assert!(ms(200) <= jittered && jittered <= ms(400), "{jittered:?}");
    }

    #[test]
    fn jitter_varies_within_the_unit_interval() {
        let samples: Vec<f64> = (0..100).map(|_| random_fraction()).collect();
        assert!(samples.iter().all(|f| (0.0..1.0).contains(f)));
        assert!(samples.iter().any(|f| *f != samples[0]), "jitter must vary");
    }
}

//! A database thread's mailbox: how its events ([`super::worker::Event`]) reach it, as an
//! unbounded mpsc channel would, in a small part of the memory.
//!
//! Every database has one, for as long as it is replicated, and an idle one carries a
//! message every few seconds at most. std's unbounded channel kept, per database, about
//! 1.8 KiB once idle (massif, 100 idle databases): its shared part (512 bytes, head and
//! tail each padded to 128), a block of 31 message slots allocated at the
//! first send and kept for good (about 1 KiB), and the thread-local waker context of a
//! receiver that has waited once. Here a queue sits under a mutex with a condition
//! variable, which on Linux are one futex word each: one allocation of about 80 bytes, and
//! a queue buffer that [`Inbox::shrink`] gives back while the queue is empty.
//!
//! The semantics are the channel's, for what walsync uses: messages arrive in the order they
//! were sent; the receiver hears [`RecvTimeoutError::Disconnected`] once every [`Post`] is
//! gone and the queue is empty; sending fails, handing the message back, once the [`Inbox`]
//! is gone, and the messages still queued then are dropped (so whoever waits on a reply
//! channel inside one hears that it will get no answer).

use std::collections::VecDeque;
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// A new mailbox: the sending side (clone it for each sender) and the receiving side.
pub(super) fn mailbox<T>() -> (Post<T>, Inbox<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            posts: 1,
            inbox: true,
        }),
        ready: Condvar::new(),
    });
    (
        Post {
            shared: Arc::clone(&shared),
        },
        Inbox { shared },
    )
}

struct Shared<T> {
    state: Mutex<State<T>>,
    /// Signalled when a message is queued or the last post goes.
    ready: Condvar,
}

struct State<T> {
    queue: VecDeque<T>,
    /// Live [`Post`]s.
    posts: usize,
    /// The [`Inbox`] is alive.
    inbox: bool,
}

impl<T> Shared<T> {
    /// Every change under the lock is a single push, pop, count or flag, so a lock poisoned
    /// by a panicking holder is still consistent: keep using it.
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The sending side of a mailbox.
pub(super) struct Post<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Post<T> {
    /// Queue `message` and wake the receiver; the message back if the [`Inbox`] is gone.
    pub(super) fn send(&self, message: T) -> Result<(), T> {
        let mut state = self.shared.lock();
        if !state.inbox {
            return Err(message);
        }
        state.queue.push_back(message);
        drop(state);
        self.shared.ready.notify_one();
        Ok(())
    }
}

impl<T> Clone for Post<T> {
    fn clone(&self) -> Self {
        self.shared.lock().posts += 1;
        Post {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<T> Drop for Post<T> {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.posts -= 1;
        let last = state.posts == 0;
        drop(state);
        if last {
            self.shared.ready.notify_one();
        }
    }
}

/// The receiving side of a mailbox.
pub(super) struct Inbox<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Inbox<T> {
    /// The next message, waiting up to `wait` for one; `Disconnected` once the queue is
    /// empty and every [`Post`] is gone.
    pub(super) fn recv_timeout(&self, wait: Duration) -> Result<T, RecvTimeoutError> {
        let deadline = Instant::now().checked_add(wait);
        let mut state = self.shared.lock();
        loop {
            if let Some(message) = state.queue.pop_front() {
                return Ok(message);
            }
            if state.posts == 0 {
                return Err(RecvTimeoutError::Disconnected);
            }
            state = match deadline {
                // Too far away to represent: wait as long as it takes.
                None => self
                    .shared
                    .ready
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(RecvTimeoutError::Timeout);
                    }
                    self.shared
                        .ready
                        .wait_timeout(state, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
    }

    /// The next message if one is queued, without waiting.
    pub(super) fn try_recv(&self) -> Option<T> {
        self.shared.lock().queue.pop_front()
    }

    /// Give back the queue's buffer if nothing is queued (an idle database's thread calls
    /// this before it sleeps: the next message allocates a small one again).
    pub(super) fn shrink(&self) {
        let mut state = self.shared.lock();
        if state.queue.is_empty() {
            state.queue = VecDeque::new();
        }
    }
}

impl<T> Drop for Inbox<T> {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.inbox = false;
        let queued = std::mem::take(&mut state.queue);
        drop(state);
        // Outside the lock: a message's drop may do anything (a reply sender wakes its
        // waiter).
        drop(queued);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn messages_arrive_in_order_and_a_quiet_mailbox_times_out() {
        let (post, inbox) = mailbox();
        for i in 0..100 {
            post.send(i).unwrap();
        }
        for i in 0..100 {
            assert_eq!(inbox.recv_timeout(Duration::from_secs(1)), Ok(i));
        }
        assert_eq!(inbox.try_recv(), None);
        let started = Instant::now();
        assert_eq!(
            inbox.recv_timeout(Duration::from_millis(50)),
            Err(RecvTimeoutError::Timeout)
        );
        assert!(started.elapsed() >= Duration::from_millis(50));
        // A wait too long to represent as an Instant is a wait with no deadline.
        let late = post.clone();
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            late.send(7).unwrap();
        });
        assert_eq!(inbox.recv_timeout(Duration::MAX), Ok(7));
        sender.join().unwrap();
    }

    #[test]
    fn a_message_from_another_thread_wakes_the_receiver() {
        let (post, inbox) = mailbox();
        let sender = std::thread::spawn(move || {
            for i in 0..1000 {
                post.clone().send(i).unwrap();
            }
        });
        for i in 0..1000 {
            assert_eq!(inbox.recv_timeout(Duration::from_secs(10)), Ok(i));
        }
        sender.join().unwrap();
        // Every post is gone now.
        assert_eq!(
            inbox.recv_timeout(Duration::from_secs(10)),
            Err(RecvTimeoutError::Disconnected)
        );
    }

    /// Messages queued before the last post went are still delivered; then the receiver
    /// hears the disconnection at once, also when it was already waiting.
    #[test]
    fn the_receiver_hears_when_the_last_post_goes() {
        let (post, inbox) = mailbox();
        let second = post.clone();
        post.send(1).unwrap();
        drop(post);
        assert_eq!(inbox.recv_timeout(Duration::from_secs(1)), Ok(1));
        let dropper = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            drop(second);
        });
        let started = Instant::now();
        assert_eq!(
            inbox.recv_timeout(Duration::from_secs(10)),
            Err(RecvTimeoutError::Disconnected)
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        dropper.join().unwrap();
    }

    /// Once the inbox is gone a send hands its message back, and what was queued is
    /// dropped: whoever waits for a reply inside a queued message hears there will be none.
    #[test]
    fn sending_to_a_dropped_inbox_fails_and_queued_messages_are_dropped() {
        let (post, inbox) = mailbox();
        let (reply, answer) = mpsc::channel::<()>();
        post.send(reply).unwrap();
        drop(inbox);
        assert!(
            answer.recv().is_err(),
            "the queued reply sender was dropped"
        );
        let (reply, _answer) = mpsc::channel::<()>();
        assert!(post.send(reply).is_err());
    }

    #[test]
    fn shrinking_frees_an_empty_queue_only() {
        let (post, inbox) = mailbox();
        for i in 0..10 {
            post.send(i).unwrap();
        }
        inbox.shrink();
        assert_eq!(
            inbox.shared.lock().queue.len(),
            10,
            "nothing queued is lost"
        );
        while inbox.try_recv().is_some() {}
        assert!(inbox.shared.lock().queue.capacity() > 0);
        inbox.shrink();
        assert_eq!(inbox.shared.lock().queue.capacity(), 0);
        post.send(11).unwrap();
        assert_eq!(inbox.try_recv(), Some(11));
    }
}

//! Calls recorded once by a backend that records (a GPU's CUDA graphs) and replayed in place of
//! issuing them again: decoding steps and training passes, each keyed by what shapes its calls.
//!
//! Calls of a key are recorded the second time in a row they come, after the first has run
//! call by call (warming up the libraries they use, which must not start up while being
//! recorded). A failure to record or replay is kept and the calls are issued one by one from
//! then on, with the same results.

use crate::backend::{Backend, Recording};

/// What to do with the calls of one key.
enum Next {
    /// Issue them call by call.
    Direct,
    /// Record them (see [`record`]), then replay the recording.
    Record,
    Replay(Recording),
}

/// The recordings of one user (a decoder, an engine), by key.
pub struct Replays<K> {
    off: bool,
    /// The backend does not record.
    unsupported: bool,
    /// Why recording or replaying failed, after which calls are issued one by one.
    failure: Option<String>,
    /// (key, recording), oldest first; at most `capacity`.
    kept: Vec<(K, Recording)>,
    capacity: usize,
    /// The key whose calls last ran call by call.
    ran_directly: Option<K>,
}

impl<K: Copy + PartialEq> Replays<K> {
    /// Keeps up to `capacity` recordings (the oldest is forgotten to make room).
    pub fn new(capacity: usize) -> Self {
        Self {
            off: false,
            unsupported: false,
            failure: None,
            kept: Vec::new(),
            capacity: capacity.max(1),
            ran_directly: None,
        }
    }

    /// Turns replays on (the default) or off (every call issued, for comparisons), forgetting
    /// any failure; off forgets the recordings too.
    pub fn set_on(&mut self, on: bool, backend: &mut dyn Backend) {
        self.off = !on;
        self.failure = None;
        if !on {
            for (_, r) in self.kept.drain(..) {
                backend.forget(r);
            }
        }
    }

    /// Whether calls are replayed: on, the backend records, nothing failed, and something has
    /// been recorded.
    pub fn replaying(&self) -> bool {
        !self.off && !self.unsupported && self.failure.is_none() && !self.kept.is_empty()
    }

    /// Why calls are issued one by one on a backend that records.
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    fn next(&mut self, key: K) -> Next {
        if self.off || self.unsupported || self.failure.is_some() {
            return Next::Direct;
        }
        if let Some(&(_, r)) = self.kept.iter().find(|(k, _)| *k == key) {
            return Next::Replay(r);
        }
        if self.ran_directly != Some(key) {
            self.ran_directly = Some(key);
            return Next::Direct;
        }
        Next::Record
    }

    /// Takes the outcome of [`record`] for `key`: the recording to replay (None: the calls
    /// are then issued; a failure is kept, a backend that does not record remembered), and a
    /// recording that made room for it, for the caller to forget.
    fn recorded(
        &mut self,
        key: K,
        outcome: anyhow::Result<Option<Recording>>,
    ) -> (Option<Recording>, Option<Recording>) {
        match outcome {
            Ok(Some(recording)) => {
                let evicted = (self.kept.len() == self.capacity).then(|| self.kept.remove(0).1);
                self.kept.push((key, recording));
                (Some(recording), evicted)
            }
            Ok(None) => {
                self.unsupported = true;
                (None, None)
            }
            Err(e) => {
                self.failure = Some(format!("{e:#}"));
                (None, None)
            }
        }
    }
}

/// Runs `calls` on `owner` for `key` (at decoding position `pos`): replayed from their
/// recording, recorded first when their turn comes, or issued one by one.
pub fn run<T: ?Sized, K: Copy + PartialEq>(
    owner: &mut T,
    replays: fn(&mut T) -> &mut Replays<K>,
    backend: fn(&mut T) -> &mut dyn Backend,
    key: K,
    pos: usize,
    calls: impl Fn(&mut T),
) {
    let recording = match replays(owner).next(key) {
        Next::Direct => None,
        Next::Replay(recording) => Some(recording),
        Next::Record => {
            let outcome = record(owner, backend, &calls);
            let (recording, evicted) = replays(owner).recorded(key, outcome);
            if let Some(old) = evicted {
                backend(owner).forget(old);
            }
            recording
        }
    };
    if let Some(recording) = recording {
        match backend(owner).replay(recording, pos) {
            Ok(()) => return,
            Err(e) => replays(owner).failure = Some(format!("{e:#}")),
        }
    }
    calls(owner)
}

/// Records `calls` made on `owner`'s backend (None: the backend does not record). A panic
/// while recording (a failed check) ends the recording before it goes on, so a caller that
/// survives it (the server) finds the backend issuing calls again.
fn record<T: ?Sized>(
    owner: &mut T,
    backend: fn(&mut T) -> &mut dyn Backend,
    calls: impl FnOnce(&mut T),
) -> anyhow::Result<Option<Recording>> {
    if !backend(owner).begin_recording()? {
        return Ok(None);
    }
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| calls(owner)));
    if let Err(panic) = ran {
        if let Ok(partial) = backend(owner).end_recording() {
            backend(owner).forget(partial);
        }
        std::panic::resume_unwind(panic);
    }
    backend(owner).end_recording().map(Some)
}

//! The one thread that owns the model: it takes waiting requests in rounds, decodes every
//! image of a round as one batch, streams each request its rows, and drops the images of a
//! request whose client has gone.
//!
//! A round holds requests that keep the same number of pixels (so their shared part goes
//! through the model in one prefill and no image's pixels depend on its neighbours); requests
//! that arrive while a round runs wait for the next one.

use crate::model::Decoder;
use crate::sample::{self, ImageSpec, SampleOptions};
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// What a request asks the model for.
pub(crate) struct Job {
    /// The known first tokens of every image (all of them when scoring).
    pub prefix: Vec<u16>,
    /// Images to generate from the prefix (1 when scoring).
    pub images: usize,
    pub opts: SampleOptions,
    /// Tokens fed in the prefill: requests share a round only when these are equal.
    pub prefill: usize,
    pub events: UnboundedSender<Event>,
}

/// What the scheduler tells a request, in this order: `Start`, `Row`s, then `Done` or `Failed`.
#[derive(Debug)]
pub(crate) enum Event {
    Start {
        round: u64,
        round_requests: usize,
        round_images: usize,
        waited: Duration,
    },
    /// Row `row` of every image of the request (`[images, side]` tokens).
    Row {
        row: usize,
        tokens: Vec<u16>,
    },
    Done {
        /// `[images, n_ctx]`.
        tokens: Vec<u16>,
        /// Negative log-likelihood (nats) of the known tokens fed after the prefill, and their
        /// count (every token of a scored image).
        nats: f64,
        scored: usize,
        seconds: f64,
    },
    Failed(String),
}

/// Counters for `/api/status`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Stats {
    pub waiting: usize,
    pub running: bool,
    pub rounds: u64,
    /// Rounds that ended in an error (their requests were told so).
    pub rounds_failed: u64,
    pub requests_done: u64,
    pub requests_cancelled: u64,
    pub requests_refused: u64,
    pub images_generated: u64,
    pub tokens_decoded: u64,
    /// Pixels not generated because their request's client had gone.
    pub tokens_skipped: u64,
    /// Requests and images in the last round.
    pub last_round_requests: usize,
    pub last_round_images: usize,
}

/// The queue full: the request is refused at once.
#[derive(Debug, thiserror::Error)]
#[error(
    "the server is busy: {0} requests are already waiting (the queue is full); try again in a moment"
)]
pub struct Busy(pub usize);

struct State {
    waiting: VecDeque<(Job, Instant)>,
    stats: Stats,
    /// Set when the scheduler thread has ended: nothing queued would ever run.
    stopped: bool,
}

/// Requests waiting for the model, shared by the HTTP handlers and the scheduler thread.
pub(crate) struct Queue {
    state: Mutex<State>,
    arrived: Condvar,
    capacity: usize,
}

/// Why a request was not queued.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refused {
    #[error(transparent)]
    Busy(#[from] Busy),
    #[error("the model's scheduler has stopped; restart the server")]
    Stopped,
}

impl Queue {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                waiting: VecDeque::new(),
                stats: Stats::default(),
                stopped: false,
            }),
            arrived: Condvar::new(),
            capacity,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic elsewhere cannot leave the queue half-changed: every change is one push,
        // pop or counter update.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn submit(&self, job: Job) -> Result<(), Refused> {
        let mut s = self.lock();
        if s.stopped {
            return Err(Refused::Stopped);
        }
        // Requests whose client has left give their places up before the queue counts as full.
        s.drop_cancelled();
        if s.waiting.len() >= self.capacity {
            s.stats.requests_refused += 1;
            return Err(Busy(s.waiting.len()).into());
        }
        s.waiting.push_back((job, Instant::now()));
        s.stats.waiting = s.waiting.len();
        self.arrived.notify_all();
        Ok(())
    }

    pub fn stats(&self) -> Stats {
        self.lock().stats.clone()
    }

    /// Blocks until a request waits, then gives the next round: the first waiting request and
    /// those after it with the same prefill, up to `max_images` images. When the first
    /// request's round is not full, more requests may join for up to `gather`.
    fn next_round(&self, max_images: usize, gather: Duration) -> Vec<(Job, Instant)> {
        let mut s = self.lock();
        let mut deadline: Option<Instant> = None;
        loop {
            s.drop_cancelled();
            let Some((first, _)) = s.waiting.front() else {
                deadline = None;
                s = self.arrived.wait(s).unwrap_or_else(|e| e.into_inner());
                continue;
            };
            let key = first.prefill;
            let fits: usize = s
                .waiting
                .iter()
                .filter(|(j, _)| j.prefill == key)
                .map(|(j, _)| j.images)
                .sum();
            let now = Instant::now();
            let until = *deadline.get_or_insert(now + gather);
            if fits < max_images && now < until {
                s = self
                    .arrived
                    .wait_timeout(s, until - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                continue;
            }
            let mut round = Vec::new();
            let mut images = 0;
            let mut rest = VecDeque::new();
            while let Some((job, at)) = s.waiting.pop_front() {
                // The first request always goes (the HTTP side keeps it within a round; were it
                // larger, its round fails with the decoder's message instead of stalling here).
                if job.prefill == key && (round.is_empty() || images + job.images <= max_images) {
                    images += job.images;
                    round.push((job, at));
                } else {
                    rest.push_back((job, at));
                }
            }
            s.waiting = rest;
            s.stats.waiting = s.waiting.len();
            s.stats.running = true;
            return round;
        }
    }
}

impl State {
    /// Forgets the waiting requests whose client has left.
    fn drop_cancelled(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|(j, _)| !j.events.is_closed());
        self.stats.requests_cancelled += (before - self.waiting.len()) as u64;
        self.stats.waiting = self.waiting.len();
    }
}

/// Marks the queue stopped when the scheduler thread ends, however it ends, and tells every
/// waiting request, so no client waits for a round that will never come.
struct StopGuard(Arc<Queue>);

impl Drop for StopGuard {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.stopped = true;
        s.stats.running = false;
        for (job, _) in s.waiting.drain(..) {
            let _ = job
                .events
                .send(Event::Failed("the model's scheduler has stopped".into()));
        }
        s.stats.waiting = 0;
    }
}

/// Runs rounds until the process ends. `decoder.batch` is the most images a round holds.
pub(crate) fn run(queue: Arc<Queue>, mut decoder: Decoder, gather: Duration) {
    let _guard = StopGuard(queue.clone());
    let (side, t) = (decoder.cfg.side, decoder.cfg.n_ctx());
    let mut round_number = 0u64;
    loop {
        let round = queue.next_round(decoder.batch, gather);
        round_number += 1;
        let started = Instant::now();
        let images: usize = round.iter().map(|(j, _)| j.images).sum();
        for (job, queued) in &round {
            let _ = job.events.send(Event::Start {
                round: round_number,
                round_requests: round.len(),
                round_images: images,
                waited: started - *queued,
            });
        }
        let specs: Vec<ImageSpec> = round
            .iter()
            .flat_map(|(job, _)| {
                (0..job.images).map(move |i| ImageSpec {
                    prefix: &job.prefix,
                    opts: job.opts,
                    stream: i as u64,
                })
            })
            .collect();
        // The first image of each request, in the round's image order.
        let firsts: Vec<usize> = round
            .iter()
            .scan(0, |at, (job, _)| {
                let first = *at;
                *at += job.images;
                Some(first)
            })
            .collect();
        let prefill = round[0].0.prefill;
        let kept_rows = prefill / side;
        let mut gone = vec![false; round.len()];
        let mut skipped = 0u64;
        // A panic in a round fails that round's requests, not the server. The round runs on
        // the thread pool, as the commands do, so the kernels use its local queues.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            rayon::scope(|_| {
                sample::generate_images(&mut decoder, &specs, prefill, |row, tokens, wanted| {
                    for (r, (job, _)) in round.iter().enumerate() {
                        if gone[r] {
                            continue;
                        }
                        let send = row < kept_rows
                            || job
                                .events
                                .send(Event::Row {
                                    row,
                                    tokens: (firsts[r]..firsts[r] + job.images)
                                        .flat_map(|i| {
                                            let at = i * t + row * side;
                                            tokens[at..at + side].iter().copied()
                                        })
                                        .collect(),
                                })
                                .is_ok();
                        if job.events.is_closed() || !send {
                            gone[r] = true;
                            skipped += (job.images * (t - ((row + 1) * side).max(prefill))) as u64;
                            wanted[firsts[r]..firsts[r] + job.images].fill(false);
                        }
                    }
                })
            })
        }))
        .unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(anyhow::anyhow!("internal error: {what}"))
        });
        let seconds = started.elapsed().as_secs_f64();
        let mut s = queue.lock();
        s.stats.running = false;
        s.stats.rounds += 1;
        s.stats.last_round_requests = round.len();
        s.stats.last_round_images = images;
        s.stats.tokens_skipped += skipped;
        match result {
            Ok(done) => {
                for (r, (job, _)) in round.iter().enumerate() {
                    let range = firsts[r]..firsts[r] + job.images;
                    if gone[r] {
                        s.stats.requests_cancelled += 1;
                        continue;
                    }
                    s.stats.requests_done += 1;
                    s.stats.images_generated += job.images as u64;
                    s.stats.tokens_decoded += (job.images * (t - prefill)) as u64;
                    let _ = job.events.send(Event::Done {
                        tokens: done.tokens[range.start * t..range.end * t].to_vec(),
                        nats: range.clone().map(|i| done.nats[i]).sum(),
                        scored: range.map(|i| done.scored[i]).sum(),
                        seconds,
                    });
                }
            }
            Err(e) => {
                s.stats.rounds_failed += 1;
                for (job, _) in &round {
                    let _ = job
                        .events
                        .send(Event::Failed(format!("generation failed: {e:#}")));
                }
            }
        }
        // Dropping the round closes every request's stream.
    }
}

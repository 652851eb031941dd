//! A progress bar for training runs.

use igpt::train::StepStats;
use igpt::train::run::Progress;
use indicatif::{ProgressBar, ProgressStyle};

pub struct Bar {
    bar: Option<ProgressBar>,
    last_val: Option<f64>,
}

impl Bar {
    pub fn new() -> Self {
        Self {
            bar: None,
            last_val: None,
        }
    }
}

impl Progress for Bar {
    fn message(&mut self, msg: &str) {
        match &self.bar {
            Some(b) if !b.is_hidden() => b.println(msg),
            _ => println!("{msg}"),
        }
    }

    fn start(&mut self, total: u64, done: u64) {
        let b = ProgressBar::new(total);
        b.set_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] step {pos}/{len} {msg} ETA {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        b.set_position(done);
        self.bar = Some(b);
    }

    fn step(&mut self, s: &StepStats, tokens_per_s: f64) {
        if let Some(b) = &self.bar {
            // Without a terminal the bar is hidden: log a line every tenth of the run instead.
            let every = (b.length().unwrap_or(10) / 10).max(1);
            if b.is_hidden() && s.step.is_multiple_of(every) {
                println!(
                    "step {}/{}: loss {:.4}, {:.0} tokens/s{}",
                    s.step,
                    b.length().unwrap_or(0),
                    s.loss,
                    tokens_per_s,
                    if s.ranks > 1 {
                        format!(" on {} ranks", s.ranks)
                    } else {
                        String::new()
                    }
                );
            }
            let val = self
                .last_val
                .map(|v| format!(" val {v:.4}"))
                .unwrap_or_default();
            let ranks = if s.ranks > 1 {
                format!(" on {} ranks", s.ranks)
            } else {
                String::new()
            };
            b.set_message(format!(
                "loss {:.4}{val} | {:.0} tok/s{ranks}",
                s.loss, tokens_per_s
            ));
            b.set_position(s.step);
        }
    }

    fn validated(&mut self, step: u64, nats: f64) {
        self.last_val = Some(nats);
        self.message(&format!(
            "step {step}: validation loss {nats:.4} nats/token"
        ));
    }

    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish();
        }
    }
}

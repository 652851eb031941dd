//! Stopping long jobs part-way: the callbacks a job reports its progress to may ask it to
//! stop (the Python bindings do, on Ctrl-C), and the job then ends with [`Stopped`].

use std::sync::atomic::{AtomicBool, Ordering};

/// A job stopped because its caller asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("stopped on request")]
pub struct Stopped;

/// What a long job calls with how much of it is done (images, pixels); an error stops the job
/// there and becomes its error. Every `FnMut(T)` closure is one that never stops.
pub trait Report<T>: Send {
    fn report(&mut self, done: T) -> Result<(), Stopped>;
}

impl<T, F: FnMut(T) + Send> Report<T> for F {
    fn report(&mut self, done: T) -> Result<(), Stopped> {
        self(done);
        Ok(())
    }
}

/// A callback that may stop its job: `Fallible(|done| ...)` returning `Err(Stopped)` to stop.
pub struct Fallible<F>(pub F);

impl<T, F: FnMut(T) -> Result<(), Stopped> + Send> Report<T> for Fallible<F> {
    fn report(&mut self, done: T) -> Result<(), Stopped> {
        (self.0)(done)
    }
}

/// `Err(Stopped)` once `flag` is set (from another thread): `Fallible(|_| stop::check(&flag))`.
pub fn check(flag: &AtomicBool) -> Result<(), Stopped> {
    if flag.load(Ordering::Relaxed) {
        Err(Stopped)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(mut on: impl Report<usize>) -> Result<usize, Stopped> {
        for i in 1..=10 {
            on.report(i)?;
        }
        Ok(10)
    }

    #[test]
    fn closures_never_stop_and_fallible_callbacks_do() {
        let mut seen = Vec::new();
        assert_eq!(job(|d| seen.push(d)), Ok(10));
        assert_eq!(seen.len(), 10);
        assert_eq!(
            job(Fallible(|d| if d == 3 { Err(Stopped) } else { Ok(()) })),
            Err(Stopped)
        );
        let flag = AtomicBool::new(true);
        assert_eq!(job(Fallible(|_| check(&flag))), Err(Stopped));
    }
}

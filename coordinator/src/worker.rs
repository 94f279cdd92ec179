//! The [`App`]'s own thread.
//!
//! Everything the coordinator decides runs on one dedicated OS thread that
//! owns the [`App`]: SQLite calls and their fsyncs, decoding and adding
//! uploads, round closes (a robust rule is O(n·d) to O(n²·d)), privacy
//! accounting and drift calibration. The async runtime only carries
//! network I/O, so a long round close delays answers but never the QUIC
//! endpoint: acknowledgements, keep-alives and handshakes go on, and no
//! peer reaches its idle timeout because the coordinator is busy.
//!
//! Callers hand the thread a closure over a bounded queue and await its
//! result ([`Worker::call`]); a full queue makes callers wait (each live
//! connection has at most one request in flight, and connections are
//! capped). The effects a call leaves ([`Effect`]) are carried out on the
//! thread right after it, before the next call, so that a revocation closes
//! the device's connections before anything else is decided.
//!
//! A panic on the thread ends it: the App may be half-way through a
//! change, so nothing more is decided. [`Worker::stopped`] then returns the
//! panic's message; the server closes its endpoint and the process exits
//! for its supervisor to restart it from the store. Calls made after that
//! never complete (their connections are closed with the endpoint).

use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use tokio::sync::{Notify, mpsc, oneshot};

use crate::app::{App, Effect};

/// Calls queued for the thread before callers wait.
const QUEUE: usize = 256;

type Job = Box<dyn FnOnce(&mut App) + Send>;

/// Why the thread stopped, and who waits to hear it.
#[derive(Default)]
struct Stop {
    why: Mutex<Option<String>>,
    notify: Notify,
}

/// The handle of the App's thread; dropping it lets the thread finish the
/// calls queued so far, drop the App and end, and waits for that.
pub struct Worker {
    jobs: Option<mpsc::Sender<Job>>,
    stop: Arc<Stop>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Moves `app` onto a new thread; `carry_out` is called on that thread
    /// with every effect a call leaves.
    pub fn spawn(
        mut app: App,
        carry_out: impl Fn(Effect) + Send + 'static,
    ) -> std::io::Result<Self> {
        let (jobs, mut queue) = mpsc::channel::<Job>(QUEUE);
        let stop = Arc::new(Stop::default());
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("fleet-app".into())
            .spawn(move || {
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    while let Some(job) = queue.blocking_recv() {
                        job(&mut app);
                        for effect in app.take_effects() {
                            carry_out(effect);
                        }
                    }
                }));
                if let Err(payload) = run {
                    let why = payload
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic".into());
                    *stopping.why.lock().unwrap_or_else(PoisonError::into_inner) =
                        Some(format!("the coordinator's decision thread panicked: {why}"));
                    // Stored as a permit: heard even if nobody waits yet.
                    stopping.notify.notify_one();
                }
            })?;
        Ok(Self {
            jobs: Some(jobs),
            stop,
            thread: Some(thread),
        })
    }

    /// Runs `f` on the App's thread and returns its result. Never completes
    /// once the thread has stopped (see the module docs).
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut App) -> R + Send + 'static,
    ) -> R {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |app| {
            let _ = tx.send(f(app));
        });
        let Some(jobs) = &self.jobs else {
            return std::future::pending().await;
        };
        if jobs.send(job).await.is_err() {
            return std::future::pending().await;
        }
        match rx.await {
            Ok(r) => r,
            Err(_) => std::future::pending().await,
        }
    }

    /// Completes when the thread stopped after a panic, with its message.
    pub async fn stopped(&self) -> String {
        loop {
            if let Some(why) = self
                .stop
                .why
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
            {
                // Leave the permit for any other waiter.
                self.stop.notify.notify_one();
                return why;
            }
            self.stop.notify.notified().await;
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Closing the queue ends the thread's loop once it is drained.
        self.jobs = None;
        if let Some(thread) = self.thread.take()
            && thread.thread().id() != std::thread::current().id()
        {
            let _ = thread.join();
        }
    }
}

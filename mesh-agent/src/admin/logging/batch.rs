//! Batched access lines. The tunnel writes one access line per connection (target `access`,
//! `tunnel::access`); at thousands of connections per second a `write(2)` per line costs as much
//! as formatting it (2.1% of both agents' CPU in the bench's `crr`, docs/performance.md "The
//! floor under CPU per connection") and, under Kubernetes, wakes the container runtime's log
//! reader for every line. So a thread that asked for it ([`batch_access_lines`]: each tunnel
//! shard) keeps its access lines in a buffer and writes them in one call:
//!
//! - [`FLUSH_AFTER`] after the first line that found the buffer empty (a timer on the thread's
//!   own runtime, armed only while lines wait: an idle shard never wakes for it);
//! - at once when [`FLUSH_AT`] bytes wait;
//! - before any other line the thread writes (a warning never overtakes the access lines
//!   before it: a thread's lines stay in order);
//! - when the batching ends (the shard's runtime drops its task) or the thread exits, a panic
//!   included (unwinding runs the buffer's destructor).
//!
//! Envoy batches its access log the same way (`access_log_flush_interval`, 1 s). What a
//! `SIGKILL` can lose is the last [`FLUSH_AFTER`] of access lines; every other line is written
//! at once, as before. Other threads (the main runtime, blocking tasks) write every line at once.

use std::{
    cell::RefCell,
    io::{self, Write},
    sync::Arc,
    time::Duration,
};

use tracing_subscriber::fmt::MakeWriter;

/// The target whose lines are batched.
pub const ACCESS_TARGET: &str = "access";
/// How long an access line may wait in its thread's buffer.
pub const FLUSH_AFTER: Duration = Duration::from_millis(100);
/// Buffered bytes that are written at once (about 100 lines).
pub const FLUSH_AT: usize = 32 * 1024;

/// Where batched lines go when written (for the agent: stderr, as every other line).
pub type Sink = Arc<dyn Fn(&[u8]) + Send + Sync>;

struct Batch {
    lines: Vec<u8>,
    /// Set by the first line (from the [`Batching`] writer that produced it).
    sink: Option<Sink>,
    /// Wakes the thread's flush timer when a line finds the buffer empty.
    wake: Arc<tokio::sync::Notify>,
}

impl Batch {
    fn flush(&mut self) {
        if self.lines.is_empty() {
            return;
        }
        match &self.sink {
            Some(sink) => sink(&self.lines),
            None => {
                let _ = io::stderr().write_all(&self.lines);
            }
        }
        self.lines.clear();
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        self.flush();
    }
}

thread_local! {
    static BATCH: RefCell<Option<Batch>> = const { RefCell::new(None) };
}

/// Makes the calling thread batch its access lines until the returned future is dropped. Spawn
/// it on the thread's current-thread runtime (a tunnel shard): it is the flush timer. Dropping
/// it (the runtime ending) writes what waits.
pub fn batch_access_lines() -> impl Future<Output = ()> + Send + 'static {
    let wake = Arc::new(tokio::sync::Notify::new());
    BATCH.with(|b| {
        if let Ok(mut b) = b.try_borrow_mut() {
            *b = Some(Batch {
                lines: Vec::new(),
                sink: None,
                wake: wake.clone(),
            });
        }
    });
    let stop = Stop;
    async move {
        let _stop = stop;
        loop {
            wake.notified().await;
            tokio::time::sleep(FLUSH_AFTER).await;
            flush_this_thread();
        }
    }
}

/// Ends the thread's batching (writing what waits) when the flush timer is dropped.
struct Stop;

impl Drop for Stop {
    fn drop(&mut self) {
        // `try_with`: the thread may be exiting, its thread-locals already gone (the buffer's
        // own destructor wrote it then).
        let _ = BATCH.try_with(|b| {
            if let Ok(mut b) = b.try_borrow_mut() {
                b.take();
            }
        });
    }
}

/// Writes the calling thread's waiting access lines, if it batches.
pub fn flush_this_thread() {
    let _ = BATCH.try_with(|b| {
        if let Ok(mut b) = b.try_borrow_mut()
            && let Some(batch) = b.as_mut()
        {
            batch.flush();
        }
    });
}

fn batching() -> bool {
    BATCH
        .try_with(|b| b.try_borrow().is_ok_and(|b| b.is_some()))
        .unwrap_or(false)
}

/// The subscriber's writer: access lines of a batching thread go to its buffer (and from there
/// to `sink`); every other line goes to `inner` at once, after the thread's waiting access
/// lines.
pub struct Batching<W> {
    inner: W,
    sink: Sink,
}

impl<W> Batching<W> {
    /// `sink` must write where `inner` does (the agent: both stderr).
    pub fn new(inner: W, sink: Sink) -> Self {
        Self { inner, sink }
    }
}

impl<'a, W: MakeWriter<'a>> MakeWriter<'a> for Batching<W> {
    type Writer = Line<'a, W::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        flush_this_thread();
        Line::Direct(self.inner.make_writer())
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        if meta.target() == ACCESS_TARGET && batching() {
            Line::Batched(&self.sink)
        } else {
            flush_this_thread();
            Line::Direct(self.inner.make_writer_for(meta))
        }
    }
}

/// One line's writer ([`Batching`]).
pub enum Line<'a, W> {
    Batched(&'a Sink),
    Direct(W),
}

impl<W: Write> Write for Line<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Line::Direct(w) => w.write(buf),
            Line::Batched(sink) => {
                let kept = BATCH
                    .try_with(|b| {
                        let Ok(mut b) = b.try_borrow_mut() else {
                            return false;
                        };
                        let Some(batch) = b.as_mut() else {
                            return false;
                        };
                        if batch.sink.is_none() {
                            batch.sink = Some(Arc::clone(sink));
                        }
                        let was_empty = batch.lines.is_empty();
                        batch.lines.extend_from_slice(buf);
                        if batch.lines.len() >= FLUSH_AT {
                            batch.flush();
                        } else if was_empty {
                            batch.wake.notify_one();
                        }
                        true
                    })
                    .unwrap_or(false);
                if !kept {
                    // The batching ended between choosing this writer and writing: at once.
                    sink(buf);
                }
                Ok(buf.len())
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Line::Direct(w) => w.flush(),
            Line::Batched(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tracing::{info, warn};

    use super::*;
    use crate::admin::{LogFormat, logging};

    /// A subscriber (text, `info`) writing through [`Batching`] into one shared buffer, as the
    /// agent's writes to stderr.
    fn setup() -> (impl tracing::Subscriber + Send + Sync, Arc<Mutex<Vec<u8>>>) {
        let out = Arc::new(Mutex::new(Vec::new()));
        let (o1, o2) = (out.clone(), out.clone());
        let sink: Sink = Arc::new(move |b: &[u8]| {
            o1.lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(b)
        });
        let inner = move || Direct(o2.clone());
        let (s, _handle) =
            logging::subscriber(LogFormat::Text, "info", Batching::new(inner, sink), false)
                .expect("subscriber");
        (s, out)
    }

    struct Direct(Arc<Mutex<Vec<u8>>>);

    impl Write for Direct {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn lines(out: &Mutex<Vec<u8>>) -> Vec<String> {
        String::from_utf8_lossy(&out.lock().expect("buffer"))
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn paused_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("runtime")
    }

    #[test]
    fn without_batching_access_lines_are_written_at_once() {
        let (s, out) = setup();
        std::thread::spawn(move || {
            tracing::subscriber::with_default(s, || info!(target: "access", n = 1, "connection"));
        })
        .join()
        .expect("thread");
        assert_eq!(lines(&out).len(), 1);
    }

    #[test]
    fn a_batching_thread_writes_its_access_lines_after_the_flush_interval() {
        let (s, out) = setup();
        let rt = paused_runtime();
        let _guard = tracing::subscriber::set_default(s);
        rt.block_on(async {
            tokio::spawn(batch_access_lines());
            tokio::task::yield_now().await;
            info!(target: "access", n = 1, "connection");
            info!(target: "access", n = 2, "connection");
            assert!(lines(&out).is_empty(), "waiting: {:?}", lines(&out));
            // Paused time: the runtime jumps to the flush timer when nothing else runs.
            tokio::time::sleep(FLUSH_AFTER / 2).await;
            assert!(lines(&out).is_empty(), "not before the interval");
            tokio::time::sleep(FLUSH_AFTER).await;
            let l = lines(&out);
            assert_eq!(l.len(), 2, "{l:?}");
            assert!(l[0].contains("n=1") && l[1].contains("n=2"), "{l:?}");
            // The timer is armed again by the next line.
            info!(target: "access", n = 3, "connection");
            tokio::time::sleep(FLUSH_AFTER * 2).await;
            assert_eq!(lines(&out).len(), 3);
        });
    }

    #[test]
    fn another_line_of_the_thread_writes_the_waiting_access_lines_first() {
        let (s, out) = setup();
        let rt = paused_runtime();
        let _guard = tracing::subscriber::set_default(s);
        rt.block_on(async {
            tokio::spawn(batch_access_lines());
            tokio::task::yield_now().await;
            info!(target: "access", n = 1, "connection");
            warn!("something else");
            let l = lines(&out);
            assert_eq!(l.len(), 2, "{l:?}");
            assert!(l[0].contains("n=1"), "the access line first: {l:?}");
            assert!(l[1].contains("something else"), "{l:?}");
        });
    }

    #[test]
    fn a_full_buffer_is_written_at_once() {
        let (s, out) = setup();
        let rt = paused_runtime();
        let _guard = tracing::subscriber::set_default(s);
        rt.block_on(async {
            tokio::spawn(batch_access_lines());
            tokio::task::yield_now().await;
            let pad = "x".repeat(1000);
            let mut n = 0;
            while lines(&out).is_empty() {
                n += 1;
                assert!(n <= FLUSH_AT / 1000 + 1, "written by {n} lines of 1 KB");
                info!(target: "access", n, pad, "connection");
            }
            assert_eq!(lines(&out).len(), n, "every line, none split");
        });
    }

    #[test]
    fn ending_the_batching_writes_what_waits() {
        let (s, out) = setup();
        let rt = paused_runtime();
        let _guard = tracing::subscriber::set_default(s);
        rt.block_on(async {
            tokio::spawn(batch_access_lines());
            tokio::task::yield_now().await;
            info!(target: "access", n = 1, "connection");
        });
        assert!(lines(&out).is_empty());
        drop(rt);
        assert_eq!(
            lines(&out).len(),
            1,
            "written when the runtime dropped the timer"
        );
        // The thread no longer batches.
        info!(target: "access", n = 2, "connection");
        assert_eq!(lines(&out).len(), 2);
    }
}

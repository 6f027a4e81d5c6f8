//! Batched access lines. The tunnel writes one access line per connection (target `access`,
//! `tunnel::access`); at thousands of connections per second a `write(2)` per line costs as much
//! as formatting it (2.1% of both agents' CPU in the bench's `crr`, docs/performance.md "The
//! floor under CPU per connection") and, under Kubernetes, wakes the container runtime's log
//! reader for every line. So a thread that asked for it (each tunnel shard: [`batch_access_lines`]
//! and [`write_when_idle`] as its runtime's park hook) keeps its access lines in a buffer and
//! writes what waits in one call:
//!
//! - when the thread goes idle (its runtime parks), if its last write is [`MIN_GAP`] old;
//!   otherwise when it is (a timer on the thread's own runtime, armed only while lines wait).
//!   A lightly loaded agent thus writes every line as soon as its connection is done, and a
//!   busy one at most once per [`MIN_GAP`];
//! - at once when [`FLUSH_AT`] bytes wait;
//! - before any other line the thread writes (a warning never overtakes the access lines
//!   before it: a thread's lines stay in order);
//! - when the batching ends (the shard's runtime drops its task) or the thread exits, a panic
//!   included (unwinding runs the buffer's destructor).
//!
//! A `SIGKILL` can lose what waits: at most [`MIN_GAP`] of access lines. Every other line, and
//! every line of other threads (the main runtime, blocking tasks), is written at once.

use std::{
    cell::RefCell,
    io::{self, Write},
    sync::Arc,
    time::Duration,
};

// Tokio's clock (the same as std's outside tests; pausable in them).
use tokio::time::Instant;

use tracing_subscriber::fmt::MakeWriter;

/// The target whose lines are batched: the access log's (`tunnel::access`).
pub const ACCESS_TARGET: &str = "access";
/// The least time between two writes of a thread's batch.
pub const MIN_GAP: Duration = Duration::from_millis(10);
/// Buffered bytes that are written at once (about 100 lines).
pub const FLUSH_AT: usize = 32 * 1024;

/// Where batched lines go when written (for the agent: stderr, as every other line).
pub type Sink = Arc<dyn Fn(&[u8]) + Send + Sync>;

struct Batch {
    lines: Vec<u8>,
    /// Set by the first line (from the [`Batching`] writer that produced it).
    sink: Option<Sink>,
    /// When the batch was last written (never: `None`).
    written: Option<Instant>,
    /// Wakes the thread's timer when lines wait too soon after a write.
    wake: Arc<tokio::sync::Notify>,
    /// The timer is woken and will write.
    armed: bool,
}

impl Batch {
    /// When what waits may be written (`None`: nothing waits).
    fn due(&self) -> Option<Instant> {
        if self.lines.is_empty() {
            return None;
        }
        Some(self.written.map_or_else(Instant::now, |w| w + MIN_GAP))
    }

    fn flush(&mut self) {
        self.armed = false;
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
        self.written = Some(Instant::now());
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

/// Runs `f` on the calling thread's batch, if it batches and the batch is not in use.
fn with_batch<R>(f: impl FnOnce(&mut Batch) -> R) -> Option<R> {
    BATCH
        .try_with(|b| {
            let mut b = b.try_borrow_mut().ok()?;
            b.as_mut().map(f)
        })
        .ok()
        .flatten()
}

/// Makes the calling thread batch its access lines until the returned future is dropped. Spawn
/// it on the thread's current-thread runtime (a tunnel shard), whose park hook calls
/// [`write_when_idle`]: the future is the timer for lines that wait after a recent write.
/// Dropping it (the runtime ending) writes what waits.
pub fn batch_access_lines() -> impl Future<Output = ()> + Send + 'static {
    let wake = Arc::new(tokio::sync::Notify::new());
    let _ = BATCH.try_with(|b| {
        if let Ok(mut b) = b.try_borrow_mut() {
            *b = Some(Batch {
                lines: Vec::new(),
                sink: None,
                written: None,
                wake: wake.clone(),
                armed: false,
            });
        }
    });
    let stop = Stop;
    async move {
        let _stop = stop;
        loop {
            wake.notified().await;
            // Until what waits is written, by this timer or by an idle park in between (which
            // restarts the gap).
            while let Some(Some(due)) = with_batch(|b| b.due()) {
                tokio::time::sleep_until(due).await;
                with_batch(|b| {
                    if b.due().is_some_and(|due| due <= Instant::now()) {
                        b.flush();
                    }
                });
            }
        }
    }
}

/// The park hook of a batching thread's runtime: writes what waits if the last write is
/// [`MIN_GAP`] old, else arms the timer. Cheap when nothing waits (a thread-local check).
pub fn write_when_idle() {
    with_batch(|b| {
        if b.lines.is_empty() {
            return;
        }
        if b.due().is_some_and(|due| due <= Instant::now()) {
            b.flush();
        } else if !b.armed {
            b.armed = true;
            // Waking a task from the park hook makes the runtime run it instead of parking.
            b.wake.notify_one();
        }
    });
}

/// Ends the thread's batching (writing what waits) when the timer is dropped.
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
fn flush_this_thread() {
    with_batch(Batch::flush);
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
                let kept = with_batch(|batch| {
                    if batch.sink.is_none() {
                        batch.sink = Some(Arc::clone(sink));
                    }
                    batch.lines.extend_from_slice(buf);
                    if batch.lines.len() >= FLUSH_AT {
                        batch.flush();
                    }
                })
                .is_some();
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

    type Out = Arc<Mutex<Vec<u8>>>;

    /// Runs `body` as a tunnel shard would, batching: on a current-thread runtime with the park
    /// hook and paused time (it jumps to the next timer when nothing else can run), the
    /// subscriber of [`setup`] as the thread's default. Returns the runtime (still batching),
    /// the output and the subscriber's guard.
    fn on_a_shard<F: Future<Output = ()>>(
        body: impl FnOnce(Out) -> F,
    ) -> (
        tokio::runtime::Runtime,
        Out,
        tracing::subscriber::DefaultGuard,
    ) {
        let (s, out) = setup();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .on_thread_park(write_when_idle)
            .build()
            .expect("runtime");
        let guard = tracing::subscriber::set_default(s);
        let o = out.clone();
        rt.block_on(async move {
            tokio::spawn(batch_access_lines());
            tokio::task::yield_now().await;
            body(o).await;
        });
        (rt, out, guard)
    }

    /// Lets the runtime go idle once (park, with time paused no time passes).
    async fn idle() {
        tokio::time::sleep(Duration::from_nanos(1)).await;
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
    fn lines_wait_while_the_thread_is_busy_and_are_written_when_it_goes_idle() {
        on_a_shard(|out| async move {
            info!(target: "access", n = 1, "connection");
            info!(target: "access", n = 2, "connection");
            tokio::task::yield_now().await;
            assert!(lines(&out).is_empty(), "busy: {:?}", lines(&out));
            idle().await;
            let l = lines(&out);
            assert_eq!(l.len(), 2, "written together when idle: {l:?}");
            assert!(l[0].contains("n=1") && l[1].contains("n=2"), "{l:?}");
        });
    }

    #[test]
    fn a_busy_thread_writes_at_most_once_per_gap() {
        on_a_shard(|out| async move {
            info!(target: "access", n = 1, "connection");
            idle().await;
            assert_eq!(lines(&out).len(), 1, "the first line at once");
            let written = Instant::now();
            info!(target: "access", n = 2, "connection");
            idle().await;
            assert_eq!(lines(&out).len(), 1, "the second waits for the gap");
            info!(target: "access", n = 3, "connection");
            // The timer writes both at the end of the gap (paused time jumps there).
            while lines(&out).len() < 3 {
                assert!(written.elapsed() <= MIN_GAP * 2, "written within the gap");
                idle().await;
            }
            assert!(written.elapsed() >= MIN_GAP, "not before the gap");
        });
    }

    #[test]
    fn another_line_of_the_thread_writes_the_waiting_access_lines_first() {
        on_a_shard(|out| async move {
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
        on_a_shard(|out| async move {
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
        let (rt, out, _guard) = on_a_shard(|_| async {
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

//! The log's writer: lines are queued for a thread of their own, which writes them to stderr, so
//! no request's thread ever waits on a write (and, under load, one `write(2)` carries many
//! lines).
//!
//! The queue is bounded in bytes, not lines, and so is each line: a log reader that stalls (a
//! collector that died, a full pipe) costs at most [`QUEUE_BYTES`] of memory, however long the
//! lines. A line that does not fit is dropped and counted (`roomctl_log_lines_dropped_total`); a
//! line longer than [`MAX_LINE_BYTES`] is cut, saying how long it was. tracing-appender's
//! non-blocking writer bounds its queue in lines only, which is why this one exists.
//!
//! It knows nothing of what the lines say and uses no other module of roomctl: `serve` reads its
//! drop count into the metrics.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use tracing_subscriber::fmt::MakeWriter;

/// Bytes of log lines waiting for the writer thread at most; past it, lines are dropped.
pub const QUEUE_BYTES: usize = 16 * 1024 * 1024;

/// The longest line written; a longer one is cut to this, with its length noted. Callers' strings
/// are cut far shorter before they reach a line (see [`crate::telemetry::Clipped`]): this bounds
/// what nothing else does.
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// Bytes the writer thread gathers before one write.
const WRITE_BUFFER: usize = 64 * 1024;

/// What the writers of lines and the writer thread share.
struct Queue {
    lines: Sender<Vec<u8>>,
    /// Bytes queued and not yet written.
    queued: AtomicUsize,
    dropped: AtomicU64,
}

/// Makes one writer per log line, for tracing-subscriber's `fmt` layer. Cheap to clone.
#[derive(Clone)]
pub struct LogWriter {
    queue: Arc<Queue>,
}

/// Writes what is still queued when dropped (at the end of `serve`), then stops the thread,
/// waiting at most a second for a stalled reader.
pub struct Flush {
    queue: Arc<Queue>,
    done: Receiver<()>,
}

/// How long the end of `serve` waits for the last lines to be written.
const FLUSH_PATIENCE: std::time::Duration = std::time::Duration::from_secs(1);

/// A writer of lines to `out` through the byte-bounded queue, its thread started.
pub fn spawn(out: impl Write + Send + 'static) -> io::Result<(LogWriter, Flush)> {
    let (lines, queued) = crossbeam_channel::unbounded();
    let queue = Arc::new(Queue {
        lines,
        queued: AtomicUsize::new(0),
        dropped: AtomicU64::new(0),
    });
    let (finished, done) = crossbeam_channel::bounded(1);
    let drained = queue.clone();
    std::thread::Builder::new()
        .name("roomctl-log".into())
        .spawn(move || {
            write_lines(&queued, &drained, out);
            let _ = finished.send(());
        })?;
    let writer = LogWriter {
        queue: queue.clone(),
    };
    Ok((writer, Flush { queue, done }))
}

/// The writer thread: writes what is queued, then flushes, until it is told to stop (an empty
/// line, which no log line is).
fn write_lines(lines: &Receiver<Vec<u8>>, queue: &Queue, out: impl Write) {
    let mut out = io::BufWriter::with_capacity(WRITE_BUFFER, out);
    let mut stopping = false;
    while !stopping {
        let Ok(first) = lines.recv() else { return };
        let mut written = 0;
        for line in std::iter::once(first).chain(lines.try_iter()) {
            if line.is_empty() {
                stopping = true;
                continue;
            }
            written += line.len();
            // A closed or full stderr (a log collector that died) must not take the server
            // down.
            let _ = out.write_all(&line);
        }
        queue.queued.fetch_sub(written, Ordering::AcqRel);
        let _ = out.flush();
    }
}

impl LogWriter {
    /// How many lines were dropped because the queue was full.
    pub fn dropped_lines(&self) -> u64 {
        self.queue.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for Flush {
    fn drop(&mut self) {
        if self.queue.lines.send(Vec::new()).is_ok() {
            let _ = self.done.recv_timeout(FLUSH_PATIENCE);
        }
    }
}

/// One log line being formatted.
pub struct Line<'a> {
    queue: &'a Queue,
    text: Vec<u8>,
    /// Bytes of the line beyond [`MAX_LINE_BYTES`], not kept.
    cut: usize,
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        Line {
            queue: &self.queue,
            text: Vec::new(),
            cut: 0,
        }
    }
}

impl Write for Line<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = MAX_LINE_BYTES.saturating_sub(self.text.len());
        let kept = buf.len().min(room);
        self.text.extend_from_slice(&buf[..kept]);
        self.cut += buf.len() - kept;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Line<'_> {
    fn drop(&mut self) {
        let mut text = std::mem::take(&mut self.text);
        if text.is_empty() {
            return;
        }
        if self.cut > 0 {
            let total = text.len() + self.cut;
            // The cut may fall inside a character: what is kept is bytes, shown lossily.
            text.truncate(MAX_LINE_BYTES - 64);
            let _ = writeln!(text, " …[line cut: {total} bytes]");
        }
        let len = text.len();
        let queued =
            self.queue
                .queued
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                    (queued + len <= QUEUE_BYTES).then_some(queued + len)
                });
        if queued.is_err() || self.queue.lines.send(text).is_err() {
            if queued.is_ok() {
                self.queue.queued.fetch_sub(len, Ordering::AcqRel);
            }
            self.queue.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Collects what the thread writes, and can be made to block like a stalled pipe.
    #[derive(Clone, Default)]
    struct Sink {
        written: Arc<Mutex<Vec<u8>>>,
        gate: Arc<Mutex<()>>,
    }

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _open = self.gate.lock().unwrap();
            self.written.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn log(writer: &LogWriter, text: &str) {
        let mut line = writer.make_writer();
        line.write_all(text.as_bytes()).unwrap();
    }

    #[test]
    fn long_lines_are_cut_with_their_length_noted() {
        let sink = Sink::default();
        let (writer, flush) = spawn(sink.clone()).unwrap();
        log(&writer, "short\n");
        log(&writer, &format!("{}\n", "x".repeat(100_000)));
        drop(writer);
        drop(flush);
        let written = String::from_utf8(sink.written.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = written.lines().collect();
        assert_eq!(lines[0], "short");
        assert!(lines[1].len() <= MAX_LINE_BYTES, "{}", lines[1].len());
        assert!(
            lines[1].ends_with("…[line cut: 100001 bytes]"),
            "{}",
            &lines[1][lines[1].len() - 40..]
        );
    }

    #[test]
    fn a_stalled_reader_costs_the_queue_in_bytes_and_no_more() {
        let sink = Sink::default();
        let stalled = sink.gate.lock().unwrap();
        let (writer, flush) = spawn(sink.clone()).unwrap();
        let line = format!("{}\n", "y".repeat(MAX_LINE_BYTES - 1));
        let fits = QUEUE_BYTES / line.len();
        for _ in 0..fits * 3 {
            log(&writer, &line);
        }
        let queued = writer.queue.queued.load(Ordering::Acquire);
        assert!(queued <= QUEUE_BYTES, "{queued} bytes queued");
        // The thread may hold one line, blocked in its write.
        let dropped = writer.dropped_lines() as usize;
        assert!(dropped >= fits * 2 - 1, "{dropped} of {} dropped", fits * 3);
        drop(stalled);
        drop(writer);
        drop(flush);
    }
}

//! The one owner of background file work: a thread that runs, in submission order, what
//! must not run on a dispatch core — msyncs of the `interval` flush policy, a sealed
//! segment's index files, retention's unlinks, preparing the next segment file, and the
//! broker's blocking admin work (topic files, producer-id blocks, committed offsets).
//!
//! A partition's log holds a [`Files`] handle and hands work to it directly; a segment
//! made ahead of a roll comes back through a [`Pending`] the log looks at when it rolls.
//! Work whose result someone waits for ([`Files::run`]) pokes the broker's notifier when
//! done, so a request parked on it is re-polled at once.
//!
//! # Invariants
//! - Jobs run one at a time, in the order they were submitted (a commit's write and its
//!   application to memory are one job, so commits apply in the order they were stored).
//! - Nothing submitted is lost: a job submitted once the worker has stopped runs on the
//!   submitting thread (shutdown), and the worker runs everything queued before it stops.

use crossbeam_channel::{Receiver, Sender};
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use super::mmap::SegmentFile;
use super::IoWork;

type Notify = Arc<OnceLock<Box<dyn Fn() + Send + Sync>>>;

enum Job {
    Work(IoWork),
    Prepare { path: PathBuf, size: usize, reply: Sender<io::Result<SegmentFile>> },
    Run(Box<dyn FnOnce() + Send>),
    Stop,
}

impl Job {
    fn run(self, notify: &Notify) {
        match self {
            Job::Work(w) => {
                if let Err(e) = w.run() {
                    log::error!("log file work failed: {e}");
                }
            }
            Job::Prepare { path, size, reply } => {
                let made = SegmentFile::create(&path, size);
                if let Err(e) = &made {
                    log::warn!("preparing segment {}: {e} (the roll will create it)", path.display());
                }
                // The log may be gone (topic deleted): then so is the spare.
                if let Err(crossbeam_channel::SendError(Ok(file))) = reply.send(made) {
                    drop(file);
                    let _ = std::fs::remove_file(&path);
                }
            }
            Job::Run(f) => {
                f();
                if let Some(n) = notify.get() {
                    n();
                }
            }
            Job::Stop => {}
        }
    }
}

/// A handle to the file worker; cheap to clone.
#[derive(Clone)]
pub struct Files {
    /// `None`: no worker, every job runs on the submitting thread (tests, tools).
    tx: Option<Sender<Job>>,
    notify: Notify,
}

/// A result the worker will deliver.
pub struct Pending<T> {
    rx: Receiver<T>,
}

impl<T> Pending<T> {
    /// The result, once it is there.
    pub fn try_take(&self) -> Option<T> {
        self.rx.try_recv().ok()
    }
}

impl Files {
    /// No worker: jobs run where they are submitted.
    pub fn inline() -> Files {
        Files { tx: None, notify: Arc::default() }
    }

    /// What to call when a [`Files::run`] job is done (the broker's notifier). Once.
    pub fn set_notify(&self, f: Box<dyn Fn() + Send + Sync>) {
        if self.notify.set(f).is_err() {
            log::error!("file worker notifier set twice");
        }
    }

    fn submit_job(&self, job: Job) {
        let job = match &self.tx {
            Some(tx) => match tx.send(job) {
                Ok(()) => return,
                Err(crossbeam_channel::SendError(job)) => job,
            },
            None => job,
        };
        job.run(&self.notify);
    }

    /// Queues file work.
    pub fn submit(&self, work: IoWork) {
        self.submit_job(Job::Work(work));
    }

    /// Creates (preallocates and maps) a segment file of `size` bytes at `path`.
    pub fn prepare(&self, path: PathBuf, size: usize) -> Pending<io::Result<SegmentFile>> {
        let (reply, rx) = crossbeam_channel::bounded(1);
        self.submit_job(Job::Prepare { path, size, reply });
        Pending { rx }
    }

    /// Runs `f` on the worker; its result comes back through the [`Pending`].
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Pending<T> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.submit_job(Job::Run(Box::new(move || {
            let _ = tx.send(f());
        })));
        Pending { rx }
    }
}

/// The worker thread.
pub struct FileWorker {
    tx: Sender<Job>,
    thread: Option<JoinHandle<()>>,
}

impl FileWorker {
    /// Starts the worker; returns it and the first handle to it.
    pub fn spawn() -> io::Result<(FileWorker, Files)> {
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let notify: Notify = Arc::default();
        let thread = {
            let notify = notify.clone();
            std::thread::Builder::new().name("files".into()).spawn(move || {
                for job in rx {
                    if let Job::Stop = job {
                        return;
                    }
                    job.run(&notify);
                }
            })?
        };
        let files = Files { tx: Some(tx.clone()), notify };
        Ok((FileWorker { tx, thread: Some(thread) }, files))
    }

    /// Runs everything queued so far, then stops (later jobs run on their submitters).
    pub fn finish(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.tx.send(Job::Stop);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("the file worker panicked");
            }
        }
    }
}

impl Drop for FileWorker {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn jobs_run_in_order_and_after_stop_on_the_submitter() {
        let (worker, files) = FileWorker::spawn().expect("spawn");
        let woken = Arc::new(AtomicUsize::new(0));
        {
            let woken = woken.clone();
            files.set_notify(Box::new(move || {
                woken.fetch_add(1, Ordering::SeqCst);
            }));
        }
        let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let pending: Vec<_> = (0..100)
            .map(|i| {
                let seen = seen.clone();
                files.run(move || {
                    seen.lock().push(i);
                    i * 2
                })
            })
            .collect();
        let dir = tempfile::tempdir().expect("tempdir");
        let spare = files.prepare(dir.path().join("0.spare"), 8192);
        worker.finish();
        assert_eq!(*seen.lock(), (0..100).collect::<Vec<_>>());
        assert_eq!(
            pending.iter().map(|p| p.try_take()).collect::<Vec<_>>(),
            (0..100).map(|i| Some(i * 2)).collect::<Vec<_>>()
        );
        assert_eq!(woken.load(Ordering::SeqCst), 100);
        assert_eq!(spare.try_take().expect("made").expect("created").capacity(), 8192);
        // The worker is gone: work runs here, and is not lost.
        assert_eq!(files.run(|| 7).try_take(), Some(7));
    }
}

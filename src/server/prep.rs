//! Where clients' frames and control images are decoded and resized to their stream's size, off the async
//! threads and off the inference thread. Small images (up to four stream-sized frames of pixels, what cameras
//! send) go to tokio's blocking threads; big ones go to one thread of their own, one at a time in arrival
//! order, at a low CPU priority (nice 10), so that however many clients send big images, they queue behind
//! each other and never take a core from the inference thread or from small frames.
use crossbeam_channel::{bounded, Sender, TrySendError};
use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

/// Runs preparation work; cheap to share.
pub struct Preparer {
    big: Sender<Job>,
}

impl Preparer {
    /// Starts the big-image thread, with room for `queue` waiting jobs (one per client is enough: a client
    /// has at most one preparation at a time).
    pub fn new(queue: usize) -> Preparer {
        let (big, jobs) = bounded::<Job>(queue.max(1));
        let spawned = std::thread::Builder::new().name("sdstream-big-images".into()).spawn(move || {
            lower_priority();
            for job in jobs {
                job();
            }
        });
        if let Err(e) = spawned {
            tracing::error!("cannot start the big-image thread ({e}); big images will be refused");
        }
        Preparer { big }
    }

    /// Runs `work` on the big-image thread (`big`) or a blocking thread; the receiver gets its result. When
    /// the big-image queue is full the receiver is closed at once (the work is dropped).
    pub fn run<T: Send + 'static>(
        &self,
        big: bool,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> oneshot::Receiver<T> {
        let (tx, rx) = oneshot::channel();
        let job = move || {
            let _ = tx.send(work());
        };
        if big {
            if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
                self.big.try_send(Box::new(job))
            {
                tracing::warn!("the big-image queue is full; an image is dropped");
            }
        } else {
            drop(tokio::task::spawn_blocking(job));
        }
        rx
    }
}

/// Lowers the calling thread's CPU priority to nice 10 (Linux: `setpriority` on a thread id affects that
/// thread only). Best effort: a failure is logged.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid and setpriority take no pointers; they only read the calling thread's id and set its
    // scheduling priority.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        if libc::setpriority(libc::PRIO_PROCESS, tid, 10) != 0 {
            tracing::warn!(
                "cannot lower the big-image thread's priority: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn big_and_small_work_both_run() {
        let p = Preparer::new(2);
        assert_eq!(p.run(true, || 1 + 1).await.unwrap(), 2);
        assert_eq!(p.run(false, || 3).await.unwrap(), 3);
        #[cfg(target_os = "linux")]
        {
            let nice = p.run(true, || unsafe {
                libc::getpriority(libc::PRIO_PROCESS, libc::syscall(libc::SYS_gettid) as libc::id_t)
            });
            assert_eq!(nice.await.unwrap(), 10, "the big-image thread runs at nice 10");
        }
    }
}

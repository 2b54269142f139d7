//! LISTEN pipeline_event (new events) and pipeline_wake (an endpoint
//! changed, a replay) on a connection of its own (a direct one: a
//! transaction-mode pooler drops listeners), turning each notification into
//! a byte on a pipe the relay's loop waits on: ENDPOINT_CHANGED when an
//! endpoint changed (what is held for it is looked at again), POKE else. After every (re)connection
//! it pokes the loop too, since events committed while it was not listening
//! were announced to no one, and when the connection is lost, so that the
//! loop polls often until it is back.

use std::io::Write;

use postgres::fallible_iterator::FallibleIterator;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::connection::Target;

/// How often the thread looks at its stop flag while nothing is announced.
const CHECK_STOP: Duration = Duration::from_millis(500);

/// The byte of a wake-up.
pub const POKE: u8 = 1;
/// The byte of a wake-up after an endpoint changed.
pub const ENDPOINT_CHANGED: u8 = 2;

pub struct Listener {
    stop: Arc<AtomicBool>,
    /// Set while the LISTEN connection is up.
    pub listening: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    /// Starts listening; `poke` is written to on every notification.
    pub fn start(target: Target, poke: UnixStream) -> Listener {
        let stop = Arc::new(AtomicBool::new(false));
        let listening = Arc::new(AtomicBool::new(false));
        let thread = {
            let (stop, listening) = (stop.clone(), listening.clone());
            std::thread::Builder::new()
                .name("pipeline-relay listener".into())
                .spawn(move || listen(&target, poke, &stop, &listening))
                .expect("start the listener thread")
        };
        Listener {
            stop,
            listening,
            thread: Some(thread),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn listen(target: &Target, mut poke: UnixStream, stop: &AtomicBool, listening: &AtomicBool) {
    let mut backoff = Duration::from_millis(250);
    let mut last_error = None;
    while !stop.load(Ordering::SeqCst) {
        let mut client = match target.connect() {
            Ok(client) => client,
            Err(failure) => {
                if last_error.as_ref() != Some(&failure.message) {
                    tracing::warn!("LISTEN connection: {failure}; trying again");
                    last_error = Some(failure.message);
                }
                sleep_unless(stop, backoff);
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        if let Err(error) = client.batch_execute("LISTEN pipeline_event; LISTEN pipeline_wake") {
            tracing::warn!(
                "LISTEN pipeline_event: {}",
                crate::connection::classify(&error)
            );
            sleep_unless(stop, backoff);
            backoff = (backoff * 2).min(Duration::from_secs(30));
            continue;
        }
        backoff = Duration::from_millis(250);
        last_error = None;
        listening.store(true, Ordering::SeqCst);
        // NB: endpoints may have changed while it did not listen.
        let _ = poke.write(&[ENDPOINT_CHANGED]);
        while !stop.load(Ordering::SeqCst) {
            let next = client.notifications().timeout_iter(CHECK_STOP).next();
            match next {
                Ok(Some(first)) => {
                    // NB: what has arrived already is taken before poking,
                    // so that a burst of commits is one wake-up.
                    let mut changed = endpoint_changed(&first);
                    let mut buffered = client.notifications();
                    let mut buffered = buffered.iter();
                    while let Ok(Some(more)) = buffered.next() {
                        changed |= endpoint_changed(&more);
                    }
                    let _ = poke.write(&[if changed { ENDPOINT_CHANGED } else { POKE }]);
                }
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(
                        "LISTEN connection lost: {}",
                        crate::connection::classify(&error)
                    );
                    break;
                }
            }
        }
        listening.store(false, Ordering::SeqCst);
        // NB: the loop looks at once, and polls often until LISTEN is back:
        // without this poke it slept out its 30 s safety poll, reporting
        // healthy (and missing commits) meanwhile.
        let _ = poke.write(&[POKE]);
    }
}

/// pipeline_wake says which table changed (011_webhooks.sql): the endpoints
/// or their credentials, or events replayed.
fn endpoint_changed(notification: &postgres::Notification) -> bool {
    notification.channel() == "pipeline_wake"
        && matches!(notification.payload(), "webhooks" | "webhook_credentials")
}

fn sleep_unless(stop: &AtomicBool, total: Duration) {
    let step = Duration::from_millis(100);
    let mut slept = Duration::ZERO;
    while slept < total && !stop.load(Ordering::SeqCst) {
        std::thread::sleep(step);
        slept += step;
    }
}

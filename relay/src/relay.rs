//! The relay's loop: the delivery engine (the worker's, from
//! pipeline_delivery) over a client connection, woken by LISTEN or a poll
//! timer instead of the worker's latch.
//!
//! - Start: the URL is checked, the first connection made and the pipeline
//!   looked for; any failure there ends the relay (exit 2 or 3), since a
//!   mistake should be seen at once rather than retried for ever.
//! - Then a lost connection (server restart, compute suspended, network) is
//!   made again with backoff, for as long as it takes. Requests in flight
//!   carry on meanwhile; their outcomes are kept and recorded once the
//!   connection is back, so nothing is lost (an event whose lease ran out
//!   meanwhile may be sent again: delivery is at least once).
//! - --idle-disconnect: after nothing was due for that long, both
//!   connections are closed until the next poll (or the next retry due), so
//!   a Neon compute can suspend.
//! - SIGTERM or SIGINT: nothing new starts; requests in flight get
//!   --shutdown-grace to finish; what finished is recorded and the rest is
//!   handed back.
//! - --once: delivers what is due, records it and returns.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pipeline_delivery::queue::Limits;
use pipeline_delivery::{Attempt, Engine, Host, HttpClient, Job, Level, Sender};

use crate::cli::Options;
use crate::connection::{Failure, Kind, Target};
use crate::listener::Listener;
use crate::metrics::{Metrics, Server, State};
use crate::store::Store;

/// With LISTEN, the queue is still looked at this often (events made due
/// by hand, a notification lost with a connection).
const LISTEN_SAFETY_POLL: Duration = Duration::from_secs(30);
/// While the LISTEN connection is down, the queue is looked at this often.
const LISTEN_DOWN_POLL: Duration = Duration::from_secs(1);
/// Disconnected on purpose without --poll: connect again this often.
const IDLE_POLL: Duration = Duration::from_secs(300);
/// Reconnection delays: from the first to the longest, doubling.
const RECONNECT_FIRST: Duration = Duration::from_millis(250);
const RECONNECT_LONGEST: Duration = Duration::from_secs(30);
/// How often the backlog gauge is refreshed while connected.
const BACKLOG_EVERY: Duration = Duration::from_secs(5);

const BACKLOG_SQL: &str = "SELECT pg_catalog.count(*) FROM marketing.pipeline_events e \
     WHERE e.status::pg_catalog.text OPERATOR(pg_catalog.=) ANY ('{pending,failed,processing}'::pg_catalog.text[]) \
     AND EXISTS (SELECT FROM pipeline.webhooks w \
                 WHERE w.event_type::pg_catalog.text OPERATOR(pg_catalog.=) e.event_type::pg_catalog.text \
                 AND w.enabled)";

struct Relay {
    options: Options,
    target: Target,
    store: Store,
    engine: Engine,
    metrics: Arc<Metrics>,
    host: RelayHost,
    /// The read end of the listener's and the signal handler's pokes.
    poke_read: UnixStream,
    poke_write: UnixStream,
    listener: Option<Listener>,
    next_poll_at: Instant,
    /// When something was last due, claimed or in flight.
    last_busy_at: Instant,
    next_backlog_at: Instant,
    reconnect_delay: Duration,
    reconnect_at: Option<Instant>,
    /// The last reason logged for a lost connection, so that a lasting one
    /// is logged once and a new one is logged.
    last_loss: Option<String>,
    idle: bool,
}

struct RelayHost {
    stop: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

impl Host for RelayHost {
    fn interrupted(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn log(&self, level: Level, message: &str) {
        match level {
            Level::Info => tracing::info!("{message}"),
            Level::Warning => tracing::warn!("{message}"),
        }
    }

    fn recorded(&self, attempts: &[Attempt]) {
        self.metrics.recorded(attempts);
    }
}

/// Runs the relay until it is stopped (Ok) or cannot go on (the failure).
pub fn run(options: Options) -> Result<(), Failure> {
    let target = Target::parse(&options.connection_url().map_err(Failure::config)?)?;
    let client = build_client(&options)?;
    let consumer = options.name.clone().unwrap_or_else(default_name);
    if consumer.trim().is_empty() {
        return Err(Failure::config("--name: must not be empty"));
    }
    let metrics = Arc::new(Metrics::new());
    let _server = options
        .listen
        .map(|address| Server::start(address, metrics.clone()))
        .transpose()
        .map_err(Failure::config)?;

    let stop = Arc::new(AtomicBool::new(false));
    let (poke_read, poke_write) =
        UnixStream::pair().map_err(|e| Failure::config(format!("a wake-up socket: {e}")))?;
    for socket in [&poke_read, &poke_write] {
        socket
            .set_nonblocking(true)
            .map_err(|e| Failure::config(format!("a wake-up socket: {e}")))?;
    }
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone())
            .and_then(|_| signal_hook::low_level::pipe::register(signal, poke_write.try_clone()?))
            .map_err(|e| Failure::config(format!("signal handler: {e}")))?;
    }

    let mut store = Store::new(consumer.clone(), options.max_event_size);
    let facts = store.attach(target.connect()?)?;
    if let Some(pid) = facts.worker_pid {
        tracing::warn!(
            "the extension's own delivery worker (pid {pid}) delivers in this database too; \
             both share the work, but one deliverer is enough (pipeline.enabled = off stops the worker)"
        );
    }
    if options.name.is_some() {
        let released = store.release_claims()?;
        if released > 0 {
            tracing::info!("took back {released} events an earlier run of {consumer:?} held");
        }
    }
    let wake = match options.poll {
        Some(every) => format!("polling every {}", humantime::format_duration(every)),
        None => "LISTEN pipeline_event".into(),
    };
    tracing::info!(
        "pipeline-relay {} delivering from {} (sslmode {}, {wake}) as {consumer:?}",
        env!("CARGO_PKG_VERSION"),
        target.display,
        target.ssl_mode()
    );
    metrics.set_state(State::Connected, "");

    let limits = Limits {
        batch_size: options.batch_size,
        concurrency: options.concurrency as usize,
        http_timeout: options.http_timeout,
        lease: facts.lease,
        max_event_bytes: options.max_event_size,
        max_bytes_in_flight: options.max_bytes_in_flight,
        poll_interval: options.poll.unwrap_or(LISTEN_SAFETY_POLL),
        retention: facts.retention,
    };
    let engine = Engine::new(limits, sender_of(client))
        .map_err(|e| Failure::config(format!("starting the senders: {e}")))?;
    let now = Instant::now();
    let mut relay = Relay {
        next_poll_at: now + options.poll.unwrap_or(LISTEN_SAFETY_POLL),
        options,
        target,
        store,
        engine,
        host: RelayHost {
            stop,
            metrics: metrics.clone(),
        },
        metrics,
        poke_read,
        poke_write,
        listener: None,
        last_busy_at: now,
        next_backlog_at: now,
        reconnect_delay: RECONNECT_FIRST,
        reconnect_at: None,
        last_loss: None,
        idle: false,
    };
    relay.start_listener();
    let result = relay.work();
    relay.stop();
    result
}

impl Relay {
    fn stopping(&self) -> bool {
        self.host.stop.load(Ordering::SeqCst)
    }

    /// Turns until stopped; Err only with --once.
    fn work(&mut self) -> Result<(), Failure> {
        while !self.stopping() {
            let now = Instant::now();
            if now >= self.next_poll_at {
                self.engine.poll();
                self.next_poll_at = now + self.poll_every();
            }
            if !self.store.connected() {
                if let Some(failure) = self.reconnect() {
                    if self.options.once {
                        return Err(failure);
                    }
                    self.wait(self.until_reconnect());
                    continue;
                }
            }
            let wait = self.engine.turn(&mut self.store, &self.host, true);
            if !self.store.connected() {
                self.lost("the connection was lost");
                if self.options.once {
                    return Err(Failure {
                        kind: Kind::Connection,
                        message: format!("lost the connection to {}", self.target.display),
                    });
                }
                continue;
            }
            self.refresh_gauges();
            if self.options.once {
                if let Some(failure) = self.engine.last_failure() {
                    return Err(Failure::config(failure));
                }
                // Everything claimable was claimed: what is still due could
                // not be (a retry later, an endpoint probed).
                if !self.engine.busy() && !self.engine.wants_claim() {
                    return Ok(());
                }
            }
            let now = Instant::now();
            if self.engine.busy() || self.engine.due(now) {
                self.last_busy_at = now;
            } else if let Some(idle_after) = self.options.idle_disconnect {
                if now.duration_since(self.last_busy_at) >= idle_after {
                    self.go_idle();
                    continue;
                }
            }
            // NB: a poll set while LISTEN worked may be up to 30 s away; once
            // the LISTEN connection is down (the database going away, say),
            // nothing announces events or the loss: look within a second,
            // which also finds out soon if this connection went too.
            if self.listener.is_some() && !self.listening() {
                self.next_poll_at = self.next_poll_at.min(now + LISTEN_DOWN_POLL);
            }
            self.wait(wait.min(self.next_poll_at.saturating_duration_since(now)));
        }
        Ok(())
    }

    fn listening(&self) -> bool {
        self.listener
            .as_ref()
            .is_some_and(|l| l.listening.load(Ordering::SeqCst))
    }

    fn poll_every(&self) -> Duration {
        match (self.options.poll, self.idle) {
            (Some(every), _) => every,
            (None, true) => IDLE_POLL,
            // NB: while LISTEN is down, new events are looked for often.
            (None, false) if self.listening() => LISTEN_SAFETY_POLL,
            (None, false) => LISTEN_DOWN_POLL,
        }
    }

    /// Closes both connections until the next poll or retry.
    fn go_idle(&mut self) {
        self.listener = None;
        self.store.disconnect();
        self.idle = true;
        let now = Instant::now();
        let mut at = now + self.poll_every();
        if let Some(due) = self.engine.next_due_in(now) {
            at = at.min(now + due);
        }
        self.next_poll_at = at;
        self.reconnect_at = Some(at);
        self.metrics.set_state(State::Idle, "");
        tracing::info!(
            "nothing due for {}: disconnected until {} from now",
            humantime::format_duration(self.options.idle_disconnect.unwrap_or_default()),
            humantime::format_duration(Duration::from_secs(
                at.saturating_duration_since(now).as_secs()
            ))
        );
    }

    /// Connects again if it is time to; the failure when that failed.
    fn reconnect(&mut self) -> Option<Failure> {
        if self.reconnect_at.is_some_and(|at| Instant::now() < at) {
            return Some(Failure {
                kind: Kind::Connection,
                message: "waiting to reconnect".into(),
            });
        }
        let attached = self
            .target
            .connect()
            .and_then(|client| self.store.attach(client));
        match attached {
            Ok(_) => {
                if self.idle {
                    tracing::debug!("connected again after idling");
                } else {
                    tracing::info!("connected again to {}", self.target.display);
                }
                self.idle = false;
                self.reconnect_delay = RECONNECT_FIRST;
                self.reconnect_at = None;
                self.last_loss = None;
                self.last_busy_at = Instant::now();
                self.next_poll_at = Instant::now() + self.poll_every();
                self.metrics.set_state(State::Connected, "");
                self.engine.poll();
                self.start_listener();
                None
            }
            Err(failure) => {
                self.lost(&failure.message);
                Some(failure)
            }
        }
    }

    /// The connection is gone: try again after a growing delay.
    fn lost(&mut self, why: &str) {
        self.store.disconnect();
        self.listener = None;
        if self.last_loss.as_deref() != Some(why) {
            tracing::warn!("{why}; reconnecting (events in flight are recorded once connected)");
            self.last_loss = Some(why.to_string());
        }
        self.idle = false;
        self.metrics.set_state(State::Reconnecting, why);
        self.reconnect_at = Some(Instant::now() + self.reconnect_delay);
        self.reconnect_delay = (self.reconnect_delay * 2).min(RECONNECT_LONGEST);
    }

    fn until_reconnect(&self) -> Duration {
        self.reconnect_at.map_or(Duration::ZERO, |at| {
            at.saturating_duration_since(Instant::now())
        })
    }

    fn start_listener(&mut self) {
        if self.options.poll.is_some() || self.options.once || self.listener.is_some() {
            return;
        }
        match self.poke_write.try_clone() {
            Ok(poke) => self.listener = Some(Listener::start(self.target.clone(), poke)),
            Err(error) => tracing::warn!("cannot start listening ({error}); polling every 30s"),
        }
    }

    fn refresh_gauges(&mut self) {
        self.metrics
            .set_in_flight(self.engine.dispatcher().load().0);
        if self.options.listen.is_none() || Instant::now() < self.next_backlog_at {
            return;
        }
        self.next_backlog_at = Instant::now() + BACKLOG_EVERY;
        if let Ok(rows) = self.store.run(BACKLOG_SQL, &[]) {
            if let Some(count) = rows.first().and_then(|r| r.get::<_, Option<i64>>(0)) {
                self.metrics.set_backlog(count);
            }
        }
    }

    /// Sleeps until a request finishes, a notification or signal pokes, or
    /// `timeout` passes.
    fn wait(&mut self, timeout: Duration) {
        let mut fds = [
            libc::pollfd {
                fd: self.engine.dispatcher().wake_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.poke_read.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // NB: rounded up, so that a wait for 0.4 ms is not a busy loop.
        let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
        // SAFETY: two pollfds on the stack, for descriptors this relay owns.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if fds[1].revents != 0 {
            let mut buffer = [0u8; 256];
            let mut changed = false;
            while let Ok(n @ 1..) = self.poke_read.read(&mut buffer) {
                changed |= buffer[..n].contains(&crate::listener::ENDPOINT_CHANGED);
            }
            self.engine.wake();
            if changed {
                self.engine.endpoints_changed();
            }
        }
        self.engine.dispatcher().drain_wake();
    }

    /// Nothing new starts; what finished is recorded, the rest handed back.
    fn stop(&mut self) {
        self.listener = None;
        if !self.engine.busy() {
            return;
        }
        tracing::info!(
            "stopping: waiting up to {} for requests in flight",
            humantime::format_duration(self.options.shutdown_grace)
        );
        if !self.store.connected() {
            self.reconnect_at = None;
            let _ = self.reconnect();
            self.listener = None;
        }
        let grace = self.options.shutdown_grace;
        if !self.engine.stop(&mut self.store, &self.host, grace) {
            tracing::warn!(
                "could not record {} outcomes before stopping; their events are delivered again once their lease ends",
                self.engine.unrecorded()
            );
        }
    }
}

/// What the dispatcher's threads send with.
fn sender_of(client: Arc<HttpClient>) -> Sender {
    Arc::new(move |job: &Job| client.send(job))
}

fn build_client(options: &Options) -> Result<Arc<HttpClient>, Failure> {
    let blocked = pipeline_delivery::parse_networks(
        options.blocked_networks.as_deref().unwrap_or(
            pipeline_delivery::DEFAULT_BLOCKED
                .to_str()
                .unwrap_or_default(),
        ),
    )
    .map_err(|e| Failure::config(format!("--blocked-networks: {e}")))?;
    let ca_file = options.ca_file.as_ref().map(|p| p.display().to_string());
    HttpClient::new(ca_file.as_deref(), options.http_proxy.as_deref(), blocked)
        .map(Arc::new)
        .map_err(|e| Failure::config(e.named("--ca-file", "--http-proxy")))
}

/// host name and process id: unique among running relays.
fn default_name() -> String {
    let mut buffer = [0u8; 256];
    // SAFETY: gethostname writes at most buffer.len() bytes into the buffer.
    let ok = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) } == 0;
    let host = if ok {
        let end = buffer.iter().position(|b| *b == 0).unwrap_or(buffer.len());
        String::from_utf8_lossy(&buffer[..end]).into_owned()
    } else {
        "localhost".into()
    };
    format!("pipeline-relay {host}:{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn client_of(extra: &[&str]) -> Result<Arc<HttpClient>, Failure> {
        let mut args = vec!["pipeline-relay", "--database-url", "postgres://u@h/d"];
        args.extend_from_slice(extra);
        build_client(&Options::try_parse_from(args).unwrap())
    }

    #[test]
    fn bad_http_settings_name_their_flag() {
        assert!(client_of(&[]).is_ok());
        for (extra, says) in [
            (
                &["--ca-file", "/nonexistent/ca.pem"][..],
                "--ca-file /nonexistent/ca.pem: ",
            ),
            (&["--http-proxy", "ftp://proxy:21"][..], "--http-proxy: "),
            (
                &["--blocked-networks", "10.0.0.0/33"][..],
                "--blocked-networks: ",
            ),
        ] {
            let failure = client_of(extra).err().expect("refused");
            assert_eq!(failure.kind, Kind::Config);
            assert!(
                failure.message.starts_with(says),
                "{extra:?}: {}",
                failure.message
            );
        }
    }
}

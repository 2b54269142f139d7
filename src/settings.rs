//! The `pipeline.*` settings (GUCs).
//!
//! All but `pipeline.database` take effect after
//! `ALTER SYSTEM SET ...; SELECT pg_reload_conf();`: the worker rereads them
//! on SIGHUP. The queue settings (max_attempts, backoff, lease) are
//! superuser-settable per session too, because the SQL queue functions read
//! them with current_setting() wherever they run; the sql/ files carry the
//! same defaults for trigger-only installs, where this library is absent.
//!
//! Values that cannot work are refused when they are written (SET, ALTER
//! SYSTEM, the configuration file), with a message naming the setting:
//! a worker role that is a superuser, a proxy URL that does not parse.

use std::ffi::{c_char, c_void, CStr, CString};
use std::fmt;
use std::time::Duration;

use pgrx::pg_sys;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

/// The role the worker's SQL runs as when pipeline.worker_role is not set;
/// CREATE EXTENSION creates it (sql/extension/worker_role.sql).
pub const DEFAULT_WORKER_ROLE: &str = "pipeline_worker";

static ENABLED: GucSetting<bool> = GucSetting::<bool>::new(true);
static DATABASE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(500);
static CONCURRENCY: GucSetting<i32> = GucSetting::<i32>::new(16);
static HTTP_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(5_000);
static MAX_ATTEMPTS: GucSetting<i32> = GucSetting::<i32>::new(10);
static BACKOFF_BASE_MS: GucSetting<i32> = GucSetting::<i32>::new(5_000);
static BACKOFF_CAP_MS: GucSetting<i32> = GucSetting::<i32>::new(3_600_000);
static LEASE_TIME_S: GucSetting<i32> = GucSetting::<i32>::new(30);
static DISABLE_AFTER_S: GucSetting<i32> = GucSetting::<i32>::new(3 * 24 * 3600);
static STUCK_AFTER_S: GucSetting<i32> = GucSetting::<i32>::new(3600);
static WORKERS_PER_OWNER: GucSetting<i32> = GucSetting::<i32>::new(4);
static RETENTION_S: GucSetting<i32> = GucSetting::<i32>::new(7 * 24 * 3600);
static POLL_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(10_000);
static CA_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static WORKER_ROLE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"pipeline_worker"));
static HTTP_PROXY: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static HTTP_PROXY_AUTH_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static BLOCKED_NETWORKS: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(pipeline_delivery::DEFAULT_BLOCKED));
static MAX_EVENT_SIZE_KB: GucSetting<i32> = GucSetting::<i32>::new(1024);
static MAX_BYTES_IN_FLIGHT_KB: GucSetting<i32> = GucSetting::<i32>::new(64 * 1024);

/// Registers the settings; called from `_PG_init` in every process that
/// loads the library. `preloading`: loaded by shared_preload_libraries.
pub fn register(preloading: bool) {
    GucRegistry::define_bool_guc(
        c"pipeline.enabled",
        c"Whether the delivery worker delivers events.",
        c"When off, the worker keeps running but sends nothing; events wait.",
        &ENABLED,
        GucContext::Sighup,
        GucFlags::default(),
    );
    // NB: PostgreSQL only accepts a postmaster setting while
    // shared_preload_libraries load (without the workers it is moot).
    if preloading {
        GucRegistry::define_string_guc(
            c"pipeline.database",
            c"The one database to deliver for; empty (the default): every database with the extension.",
            c"Each database with the extension has a delivery worker of its own, started by CREATE EXTENSION \
              (changing this needs a server restart).",
            &DATABASE,
            GucContext::Postmaster,
            GucFlags::default(),
        );
    }
    GucRegistry::define_int_guc(
        c"pipeline.workers_per_owner",
        c"Databases of one owner that get a delivery worker, unless the owner is a superuser.",
        c"Each worker takes one of max_worker_processes: a role that may only create databases (from a \
          template with the extension) cannot take every one. A refused database is named in the log.",
        &WORKERS_PER_OWNER,
        1,
        crate::worker_slots::MAX_DATABASES as i32,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pipeline.batch_size",
        c"Events the worker claims per round.",
        c"Each round claims this many due events, delivers them concurrently, then records the outcomes.",
        &BATCH_SIZE,
        1,
        10_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pipeline.concurrency",
        c"HTTP requests the worker keeps in flight at once to one endpoint.",
        c"Each endpoint has slots of its own, so a slow one delays no other; an endpoint's max_in_flight overrides this.",
        &CONCURRENCY,
        1,
        256,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pipeline.http_timeout",
        c"Time limit of one delivery request.",
        c"An endpoint's timeout_ms overrides it. A request that runs out of time is retried.",
        &HTTP_TIMEOUT_MS,
        1,
        300_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"pipeline.max_attempts",
        c"Delivery attempts before an event is dead.",
        c"Counted from the event's creation or its last replay.",
        &MAX_ATTEMPTS,
        1,
        1_000,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pipeline.backoff_base",
        c"Delay after the first failed attempt.",
        c"The n-th retry waits backoff_base * 2^(n-1), at most backoff_cap, times a random 0.5-1.",
        &BACKOFF_BASE_MS,
        1,
        86_400_000,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"pipeline.backoff_cap",
        c"Longest delay between two attempts.",
        c"A Retry-After header from the receiver is honoured even when longer.",
        &BACKOFF_CAP_MS,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"pipeline.lease_time",
        c"How long a claimed event stays processing.",
        c"If the worker dies mid-batch, its events are claimed again once the lease ends.",
        &LEASE_TIME_S,
        1,
        86_400,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pipeline.disable_after",
        c"How long an endpoint may fail every request before it is given up.",
        c"It is then disabled, with the reason, and its waiting events are dead (pipeline.enable_webhook and \
          pipeline.replay_failed bring them back). 0 never gives up.",
        &DISABLE_AFTER_S,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pipeline.stuck_after",
        c"How long a company or slot may stay at a stage without an event for it before it counts as stuck.",
        c"marketing.vw_stuck_work lists them, pipeline.status() counts them, pipeline.verify() warns, and \
          pipeline.resume_company sets one moving again.",
        &STUCK_AFTER_S,
        1,
        i32::MAX,
        GucContext::Userset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pipeline.retention",
        c"Age after which delivered events and delivery attempts are deleted.",
        c"The worker drops a partition of the history once all its events are delivered and this old, and deletes \
          old delivered rows in small batches where a partition is kept for waiting or dead events. 0 keeps everything.",
        &RETENTION_S,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pipeline.poll_interval",
        c"Longest the worker sleeps without a wake-up.",
        c"Commits wake the worker at once; this is only a safety net.",
        &POLL_INTERVAL_MS,
        10,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"pipeline.max_event_size",
        c"Largest request body the worker sends.",
        c"A larger event is never sent: it is dead at once, with its size in the error log.",
        &MAX_EVENT_SIZE_KB,
        1,
        1024 * 1024,
        GucContext::Sighup,
        GucFlags::UNIT_KB,
    );
    GucRegistry::define_int_guc(
        c"pipeline.max_bytes_in_flight",
        c"Request bodies the worker holds at once, waiting or in flight.",
        c"Claims stop adding events at this size (one event always comes), so memory stays bounded whatever the events hold.",
        &MAX_BYTES_IN_FLIGHT_KB,
        1024,
        4 * 1024 * 1024,
        GucContext::Sighup,
        GucFlags::UNIT_KB,
    );
    GucRegistry::define_string_guc(
        c"pipeline.ca_file",
        c"Extra PEM file of CA certificates trusted for https endpoints.",
        c"Added to the system trust store; empty for none.",
        &CA_FILE,
        GucContext::Sighup,
        GucFlags::default(),
    );
    // SAFETY: the hooks are #[pg_guard]ed extern functions that only read
    // their argument and the catalogs; the settings are statics.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"pipeline.worker_role",
            c"Role the delivery worker's SQL runs as.",
            c"Must not be a superuser. CREATE EXTENSION creates pipeline_worker with exactly the rights the worker needs; another role must be a member of it.",
            &WORKER_ROLE,
            GucContext::Sighup,
            GucFlags::default(),
            Some(check_worker_role),
            None,
            None,
        );
        GucRegistry::define_string_guc_with_hooks(
            c"pipeline.http_proxy",
            c"Proxy for webhook requests (http://host:port, socks5://host:port); empty for none.",
            c"The server's environment (HTTP_PROXY, ALL_PROXY, NO_PROXY) is never consulted. \
              Credentials go in pipeline.http_proxy_auth_file: every role reads settings.",
            &HTTP_PROXY,
            GucContext::Sighup,
            GucFlags::default(),
            Some(check_http_proxy),
            None,
            None,
        );
        GucRegistry::define_string_guc_with_hooks(
            c"pipeline.blocked_networks",
            c"Addresses and ranges the worker never connects to, checked after DNS resolution.",
            c"Comma-separated, such as 169.254.0.0/16, fe80::/10. The default refuses link-local and cloud metadata addresses, multicast and broadcast; loopback and private ranges are allowed. A refused address is a failed delivery that is not retried.",
            &BLOCKED_NETWORKS,
            GucContext::Sighup,
            GucFlags::default(),
            Some(check_blocked_networks),
            None,
            None,
        );
    }
    GucRegistry::define_string_guc(
        c"pipeline.http_proxy_auth_file",
        c"File whose first line is the proxy's user:password (as a URL writes them); empty for none.",
        c"Read by the worker at start and on every reload; make it readable by the server's user only.",
        &HTTP_PROXY_AUTH_FILE,
        GucContext::Sighup,
        GucFlags::default(),
    );
    // SAFETY: a plain call with a static C string, in _PG_init.
    unsafe { pg_sys::MarkGUCPrefixReserved(c"pipeline".as_ptr()) };
}

/// Refuses a worker role that is a superuser (when the catalogs can be read,
/// that is in a session; at server start the worker checks it again).
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn check_worker_role(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: PostgreSQL passes a valid pointer to the proposed value.
    let Some(name) = (unsafe { string_value(newval) }) else {
        return refuse(c"pipeline.worker_role must name a role");
    };
    if name.trim().is_empty() || name.len() >= pg_sys::NAMEDATALEN as usize {
        return refuse(c"pipeline.worker_role must name a role (1-63 bytes)");
    }
    // NB: catalog look-ups need a transaction; outside one (server start,
    // reload in the postmaster) the worker checks the role itself.
    // SAFETY: a plain query of the transaction state.
    if unsafe { pg_sys::IsTransactionState() } {
        let cname = CString::new(name).unwrap_or_default();
        // SAFETY: inside a transaction; NUL-terminated name.
        let superuser = unsafe {
            let oid = pg_sys::get_role_oid(cname.as_ptr(), true);
            oid != pg_sys::InvalidOid && pg_sys::superuser_arg(oid)
        };
        if superuser {
            return refuse(
                c"pipeline.worker_role names a superuser: the worker must run as a role without superuser rights",
            );
        }
    }
    true
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn check_http_proxy(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: PostgreSQL passes a valid pointer to the proposed value.
    match unsafe { string_value(newval) } {
        // NB: every role reads a setting (SHOW, pg_settings), and the worker
        // logs them: a password does not belong in one.
        Some(url) if pipeline_delivery::proxy_has_credentials(&url) => refuse(
            c"pipeline.http_proxy must not carry credentials (user:password@): every role can read a setting; \
              put them in the file named by pipeline.http_proxy_auth_file",
        ),
        Some(url) if !url.trim().is_empty() => match pipeline_delivery::proxy_of(&url) {
            Ok(_) => true,
            Err(error) => {
                let message =
                    CString::new(format!("pipeline.http_proxy: {error}")).unwrap_or_default();
                refuse(&message)
            }
        },
        _ => true,
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn check_blocked_networks(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: PostgreSQL passes a valid pointer to the proposed value.
    let list = unsafe { string_value(newval) }.unwrap_or_default();
    match pipeline_delivery::parse_networks(&list) {
        Ok(_) => true,
        Err(error) => {
            let message =
                CString::new(format!("pipeline.blocked_networks: {error}")).unwrap_or_default();
            refuse(&message)
        }
    }
}

/// The proposed value of a string setting (NULL for none).
///
/// # Safety
/// `newval` must be the pointer a GUC check hook receives.
unsafe fn string_value(newval: *mut *mut c_char) -> Option<String> {
    // SAFETY: the caller's contract; the value is a NUL-terminated string or NULL.
    unsafe {
        if newval.is_null() || (*newval).is_null() {
            return None;
        }
        Some(CStr::from_ptr(*newval).to_string_lossy().into_owned())
    }
}

/// Makes a check hook fail with `message`.
fn refuse(message: &CStr) -> bool {
    // SAFETY: GUC_check_errmsg_string is read by PostgreSQL right after the
    // hook returns false; pstrdup copies the message into its memory.
    unsafe { pg_sys::GUC_check_errmsg_string = pg_sys::pstrdup(message.as_ptr()) };
    false
}

/// What the worker needs of the settings, read on its main thread.
#[derive(Clone, PartialEq)]
pub struct WorkerSettings {
    pub enabled: bool,
    pub batch_size: i32,
    pub concurrency: usize,
    pub http_timeout: Duration,
    pub lease: Duration,
    pub retention: Duration,
    pub poll_interval: Duration,
    pub ca_file: Option<String>,
    pub worker_role: String,
    pub http_proxy: Option<String>,
    pub http_proxy_auth_file: Option<String>,
    pub max_event_bytes: usize,
    pub max_bytes_in_flight: usize,
    pub blocked_networks: String,
}

/// Logged by setting name, as an administrator writes them.
impl fmt::Debug for WorkerSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pipeline.enabled={} pipeline.worker_role={} pipeline.batch_size={} pipeline.concurrency={} \
             pipeline.http_timeout={}ms pipeline.lease_time={}s pipeline.retention={}s \
             pipeline.poll_interval={}ms pipeline.ca_file={} pipeline.http_proxy={} \
             pipeline.http_proxy_auth_file={} pipeline.max_event_size={}kB pipeline.max_bytes_in_flight={}kB pipeline.blocked_networks='{}'",
            self.enabled,
            self.worker_role,
            self.batch_size,
            self.concurrency,
            self.http_timeout.as_millis(),
            self.lease.as_secs(),
            self.retention.as_secs(),
            self.poll_interval.as_millis(),
            self.ca_file.as_deref().unwrap_or("''"),
            self.http_proxy.as_deref().unwrap_or("''"),
            self.http_proxy_auth_file.as_deref().unwrap_or("''"),
            self.max_event_bytes / 1024,
            self.max_bytes_in_flight / 1024,
            self.blocked_networks,
        )
    }
}

pub fn worker_settings() -> WorkerSettings {
    WorkerSettings {
        enabled: ENABLED.get(),
        batch_size: BATCH_SIZE.get(),
        concurrency: CONCURRENCY.get() as usize,
        http_timeout: millis(HTTP_TIMEOUT_MS.get()),
        lease: Duration::from_secs(LEASE_TIME_S.get() as u64),
        retention: Duration::from_secs(RETENTION_S.get() as u64),
        poll_interval: millis(POLL_INTERVAL_MS.get()),
        ca_file: non_empty(&CA_FILE),
        worker_role: non_empty(&WORKER_ROLE).unwrap_or_else(|| DEFAULT_WORKER_ROLE.into()),
        http_proxy: non_empty(&HTTP_PROXY),
        http_proxy_auth_file: non_empty(&HTTP_PROXY_AUTH_FILE),
        max_event_bytes: MAX_EVENT_SIZE_KB.get().max(1) as usize * 1024,
        max_bytes_in_flight: MAX_BYTES_IN_FLIGHT_KB.get().max(1) as usize * 1024,
        blocked_networks: BLOCKED_NETWORKS
            .get()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
    }
}

fn non_empty(setting: &GucSetting<Option<CString>>) -> Option<String> {
    setting
        .get()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.trim().is_empty())
}

/// pipeline.workers_per_owner: databases of one owner (not a superuser)
/// with a worker.
pub fn workers_per_owner() -> usize {
    WORKERS_PER_OWNER.get().max(1) as usize
}

/// pipeline.database: the only database served, or "" for all of them.
pub fn database() -> String {
    DATABASE
        .get()
        .map(|s| s.to_string_lossy().trim().to_string())
        .unwrap_or_default()
}

fn millis(ms: i32) -> Duration {
    Duration::from_millis(ms.max(0) as u64)
}

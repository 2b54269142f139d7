//! Privilege escalation, tried as a hostile role would: a role plants
//! functions and operators where the pipeline might resolve names (public,
//! a schema named like the database owner, ahead of pg_catalog in the
//! search_path), then makes the pipeline run: CREATE EXTENSION, the delivery
//! worker, pipeline-relay, a superuser or the owner calling the API, rows
//! written to the stage tables. Every planted function notes that it ran, tries to make its
//! planter a superuser and to copy the webhook secrets. The tests assert
//! that none of it happened.

mod support;

use std::time::Duration;

use support::receiver::{Answer, Receiver};
use support::relay::Relay;
use support::{eventually, one, repo_root, texts, Cluster};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Functions of pg_catalog the pipeline calls, planted with the same
/// signature (they win when the search_path lists pg_catalog last), and
/// overloads of `format` with exact argument types (they win wherever
/// pg_catalog stands, against its VARIADIC "any").
const PLANTED: &[(&str, &str, &str)] = &[
    ("now", "", "timestamptz"),
    ("upper", "text", "text"),
    ("lower", "text", "text"),
    ("btrim", "text", "text"),
    ("length", "text", "integer"),
    ("substr", "text, integer", "text"),
    ("strpos", "text, text", "integer"),
    ("replace", "text, text, text", "text"),
    ("starts_with", "text, text", "boolean"),
    ("current_setting", "text, boolean", "text"),
    ("jsonb_typeof", "jsonb", "text"),
    ("jsonb_strip_nulls", "jsonb", "jsonb"),
    ("pg_notify", "text, text", "void"),
    ("pg_trigger_depth", "", "integer"),
    ("pg_has_role", "oid, text", "boolean"),
    ("has_table_privilege", "oid, text", "boolean"),
    ("convert_from", "bytea, name", "text"),
    ("encode", "bytea, text", "text"),
    ("decode", "text, text", "bytea"),
    ("quote_literal", "text", "text"),
    ("to_json", "text", "json"),
    ("format", "text, text", "text"),
    ("format", "text, text, text", "text"),
    ("format", "text, text, text, text", "text"),
    ("format", "text, name, text, text", "text"),
    ("format", "text, text, regclass", "text"),
];

/// Plants PLANTED and an `=` operator on text in `schema`, as `planter`
/// (who must be able to create there).
fn plant(client: &mut postgres::Client, schema: &str, planter: &str) {
    let mut sql = format!(
        "CREATE TABLE {schema}.ran (fn text, who name, superuser boolean);
         CREATE TABLE {schema}.stolen (secret text);
         GRANT SELECT, INSERT ON {schema}.ran, {schema}.stolen TO PUBLIC;
         CREATE FUNCTION {schema}.note(fn text) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO {schema}.ran SELECT fn, current_user, r.rolsuper
             FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) current_user;
             BEGIN
                 EXECUTE 'ALTER ROLE {planter} SUPERUSER';
             EXCEPTION WHEN OTHERS THEN NULL;
             END;
             BEGIN
                 INSERT INTO {schema}.stolen SELECT c.secret FROM pipeline.webhook_credentials c;
             EXCEPTION WHEN OTHERS THEN NULL;
             END;
         END $$;
         CREATE FUNCTION {schema}.text_eq(a text, b text) RETURNS boolean LANGUAGE plpgsql AS $$
         BEGIN
             PERFORM {schema}.note('=');
             RETURN a OPERATOR(pg_catalog.=) b;
         END $$;
         CREATE OPERATOR {schema}.= (LEFTARG = text, RIGHTARG = text, FUNCTION = {schema}.text_eq);
        "
    );
    for (i, (name, args, returns)) in PLANTED.iter().enumerate() {
        let params: Vec<String> = args
            .split(", ")
            .filter(|a| !a.is_empty())
            .enumerate()
            .map(|(n, t)| format!("a{n} {t}"))
            .collect();
        let value = match *returns {
            "void" => "",
            "timestamptz" => "pg_catalog.clock_timestamp()",
            "boolean" => "true",
            "integer" => "1",
            "bytea" => "'\\x00'::bytea",
            "jsonb" | "json" => "'{}'",
            _ => "'planted'",
        };
        sql.push_str(&format!(
            "CREATE FUNCTION {schema}.{name}({params}) RETURNS {returns} LANGUAGE plpgsql AS $p{i}$
             BEGIN
                 PERFORM {schema}.note('{name}');
                 RETURN {value};
             END $p{i}$;\n",
            params = params.join(", ")
        ));
    }
    client
        .batch_execute(&sql)
        .unwrap_or_else(|e| panic!("planting in {schema}: {e}"));
}

/// The traps are live: an unqualified call from `client`'s session runs the
/// planted `format`, which notes it (`client` must not be a superuser).
fn assert_trap_springs(client: &mut postgres::Client, schema: &str) {
    client
        .batch_execute(&format!(
            "SET search_path = {schema}, pg_catalog; SELECT format('%s-%s', 'a'::text, 'b'::text)"
        ))
        .unwrap();
    let (ran, _) = planted_effects(client, schema);
    assert!(!ran.is_empty(), "the planted format did not run");
}

/// What the planted code did: the functions that ran, and stolen secrets.
fn planted_effects(client: &mut postgres::Client, schema: &str) -> (Vec<String>, i64) {
    let ran = client
        .query(
            &format!("SELECT DISTINCT pg_catalog.format('%s as %s', fn, who) FROM {schema}.ran"),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let stolen = one(
        client,
        &format!("SELECT pg_catalog.count(*) FROM {schema}.stolen"),
    );
    (ran, stolen)
}

/// Runs statements one by one (some cannot share a transaction).
fn each(client: &mut postgres::Client, statements: &[&str]) {
    for statement in statements {
        client
            .batch_execute(statement)
            .unwrap_or_else(|e| panic!("{statement}: {e}"));
    }
}

fn is_superuser(client: &mut postgres::Client, role: &str) -> bool {
    one(
        client,
        &format!("SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) '{role}'"),
    )
}

/// The API as an administrator uses it, with every kind of call.
fn use_the_pipeline(db: &mut postgres::Client, url: &str) {
    db.batch_execute(&format!(
        "SELECT pipeline.register_webhook('company_created', '{url}', secret => '{SECRET}',
                                          headers => '{{\"Authorization\": \"Basic dTpw\"}}');
         SELECT pipeline.register_webhook('audit_note', '{url}', allow_unknown_type => true);
         SELECT * FROM pipeline.import_registry(pipeline.export_registry());
         SELECT pipeline.update_webhook('audit_note', timeout_ms => 2000);
         CREATE TABLE public.orders (id int PRIMARY KEY, total numeric);
         SELECT pipeline.watch('public.orders', 'order_placed', condition => 'NEW.total > 0');
         SELECT pipeline.watch('public.orders', 'order_changed', 'UPDATE', columns => '{{total}}');
         SELECT pipeline.grant_event_type('order_placed', 'pg_monitor');
         INSERT INTO public.orders VALUES (1, 10), (2, 0);
         UPDATE public.orders SET total = total + 1;
         SELECT pipeline.unwatch('public.orders', 'order_changed');
         INSERT INTO intake.company_raw_intake (company, website) VALUES ('Acme', 'https://acme.example');
         UPDATE intake.company_raw_intake SET validated = true, validation_status = 'valid';
         SELECT pipeline.emit('audit_note', '{{\"n\": 1}}');
         SELECT * FROM pipeline.status();
         SELECT * FROM pipeline.verify();
         SELECT * FROM marketing.vw_endpoint_health;
         SELECT * FROM marketing.vw_pipeline_funnel;
         SELECT pipeline.log_error('validation', 'upstream down');
         SELECT pipeline.resolve_errors(stage => 'validation');
         SELECT * FROM pipeline.replay_failed();
         SELECT pipeline.backoff(3);"
    ))
    .unwrap_or_else(|e| panic!("using the pipeline: {e}"));
}

#[test]
fn nothing_a_database_owner_planted_runs_as_superuser() {
    let receiver = Receiver::ok();
    let cluster = Cluster::start(
        "security-owner",
        &[
            ("shared_preload_libraries", "pipeline_ext"),
            ("pipeline.database", "app"),
        ],
    );
    let mut admin = cluster.connect("postgres", "postgres");
    each(
        &mut admin,
        &[
            "CREATE ROLE app_owner LOGIN NOSUPERUSER",
            "CREATE DATABASE app OWNER app_owner",
        ],
    );
    // The owner of the database plants in public (pg_database_owner's) and
    // puts public before pg_catalog for every session in the database: the
    // worker's, and the superuser's that runs CREATE EXTENSION.
    let mut owner = cluster.connect("app", "app_owner");
    plant(&mut owner, "public", "app_owner");
    owner
        .batch_execute("ALTER DATABASE app SET search_path = public, pg_catalog")
        .unwrap();
    drop(owner);

    let mut db = cluster.connect("app", "postgres");
    assert_eq!(
        one::<String>(&mut db, "SHOW search_path"),
        "public, pg_catalog"
    );

    // The extension's schema, made by the owner before the superuser's
    // CREATE EXTENSION (PostgreSQL would take it as it is): refused, empty
    // or not, and nothing is installed.
    let mut owner = cluster.connect("app", "app_owner");
    owner.batch_execute("CREATE SCHEMA pipeline").unwrap();
    let refused = |db: &mut postgres::Client, why: &str| {
        let error = db
            .batch_execute("CREATE EXTENSION pipeline_ext")
            .unwrap_err();
        let message = error.as_db_error().unwrap().message().to_string();
        assert!(message.contains(why), "{message}");
    };
    refused(
        &mut db,
        "schema pipeline exists and belongs to app_owner, not to postgres",
    );
    owner.batch_execute("DROP SCHEMA pipeline").unwrap();
    db.batch_execute("CREATE SCHEMA pipeline; CREATE TABLE pipeline.planted (x int)")
        .unwrap();
    refused(&mut db, "schema pipeline exists and is not empty");
    db.batch_execute("DROP SCHEMA pipeline CASCADE").unwrap();
    assert_eq!(
        one::<i64>(
            &mut db,
            "SELECT count(*) FROM pg_namespace WHERE nspname IN ('intake', 'marketing')"
        ),
        0
    );
    drop(owner);

    db.batch_execute("CREATE EXTENSION pipeline_ext").unwrap();
    assert_eq!(
        one::<String>(&mut db, "SELECT extnamespace::regnamespace::text FROM pg_extension WHERE extname = 'pipeline_ext'"),
        "pipeline"
    );
    use_the_pipeline(&mut db, &receiver.url("/hook"));

    // The worker delivers in this database, as pipeline_worker.
    // company_created and audit_note have endpoints.
    receiver.wait_for(Duration::from_secs(20), "the deliveries", |r| r.len() == 2);
    eventually(
        Duration::from_secs(10),
        "the attempts to be recorded",
        || {
            one::<i64>(
                &mut db,
                "SELECT pg_catalog.count(*) FROM marketing.pipeline_delivery_attempts",
            ) == 2
        },
    );

    // pipeline-relay in the same database, as a role with the worker's
    // rights (it reads the secrets the owner cannot), the worker turned
    // off: connecting, listening, claiming, recording, reporting the
    // backlog and stopping run nothing the owner planted either.
    each(
        &mut db,
        &[
            "CREATE ROLE relay LOGIN",
            "GRANT pipeline_worker TO relay",
            "ALTER SYSTEM SET pipeline.enabled = off",
            "SELECT pg_catalog.pg_reload_conf()",
        ],
    );
    let mut relay = Relay::start(&[
        "--database-url",
        &format!(
            "postgres://relay@127.0.0.1:{}/app?sslmode=disable",
            cluster.port
        ),
        "--listen",
        &format!("127.0.0.1:{}", support::free_port()),
    ]);
    db.batch_execute("SELECT pipeline.emit('audit_note', '{\"n\": 2}')")
        .unwrap();
    receiver.wait_for(Duration::from_secs(20), "the relay's delivery", |r| {
        r.len() == 3
    });
    std::thread::sleep(Duration::from_secs(6)); // a backlog gauge refresh
    assert_eq!(relay.terminate(Duration::from_secs(20)).code(), Some(0));
    assert!(relay.log().contains("delivering from"), "{}", relay.log());
    eventually(Duration::from_secs(10), "the relay's record", || {
        one::<i64>(
            &mut db,
            "SELECT pg_catalog.count(*) FROM marketing.pipeline_delivery_attempts",
        ) == 3
    });

    let (ran, stolen) = planted_effects(&mut db, "public");
    assert!(ran.is_empty(), "planted code ran: {ran:?}");
    assert_eq!(stolen, 0, "secrets were copied");
    assert!(!is_superuser(&mut db, "app_owner"));
    let mut owner = cluster.connect("app", "app_owner");
    assert_trap_springs(&mut owner, "public");
}

#[test]
fn the_worker_has_the_rights_of_its_role_only() {
    let receiver = Receiver::ok();
    let cluster = Cluster::with_worker("security-worker-role", &[]);
    let mut db = cluster.connect("postgres", "postgres");
    each(
        &mut db,
        &[
            "CREATE ROLE courier NOSUPERUSER",
            "ALTER SYSTEM SET pipeline.worker_role = 'courier'",
            "SELECT pg_reload_conf()",
            &format!(
                "SELECT pipeline.register_webhook('audit_note', '{}', allow_unknown_type => true)",
                receiver.url("/hook")
            ),
        ],
    );
    // courier has none of pipeline_worker's rights: nothing can go out (the
    // worker is refused taking back claims or claiming, whichever it does
    // first after the reload).
    eventually(Duration::from_secs(10), "the worker to be refused", || {
        cluster
            .log()
            .contains(" failed: permission denied for table")
    });
    // The log names the SQLSTATE of a caught error.
    assert!(cluster.log().contains("(SQLSTATE 42501)"));
    db.batch_execute("SELECT pipeline.emit('audit_note')")
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(receiver.received().is_empty());

    // Given pipeline_worker's rights by membership, it delivers.
    db.batch_execute("GRANT pipeline_worker TO courier")
        .unwrap();
    receiver.wait_for(Duration::from_secs(20), "the delivery", |r| r.len() == 1);

    // A role that became a superuser after it was configured is refused.
    db.batch_execute("ALTER ROLE courier SUPERUSER").unwrap();
    db.batch_execute("SELECT pipeline.emit('audit_note')")
        .unwrap();
    eventually(
        Duration::from_secs(15),
        "the superuser to be refused",
        || {
            cluster
                .log()
                .contains("role \"courier\" is a superuser; the worker delivers nothing")
        },
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(receiver.received().len(), 1);
}

/// A receiver whose error page echoes the request it got: what is stored
/// of its answer holds none of the endpoint's secrets, and monitoring reads
/// neither what the receiver said nor the payload.
#[test]
fn an_echoed_request_leaves_no_secret_and_monitoring_reads_no_payload() {
    let receiver = Receiver::scripted(|request, _| Answer {
        body: Some(format!(
            "bad request {} {:?} {:?} body {}",
            request.path,
            request.header("authorization"),
            request.header("webhook-signature"),
            request.body
        )),
        ..Answer::status(500)
    });
    let cluster = Cluster::with_worker("security-echo", &[("pipeline.max_attempts", "1")]);
    let mut db = cluster.connect("postgres", "postgres");
    each(
        &mut db,
        &[
            &format!(
                "SELECT pipeline.register_webhook('audit_note', '{}', allow_unknown_type => true,
                     headers => '{{\"Authorization\": \"Bearer tok_live_hunter2222\"}}',
                     secret => 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw')",
                receiver.url("/hook")
            ),
            "SELECT pipeline.emit('audit_note', '{\"company\": \"Secret Corp Ltd\"}')",
            "SELECT pipeline.log_error('company_created', 'Secret Corp Ltd was refused', NULL, '{\"company\": \"Secret Corp Ltd\"}')",
            "CREATE ROLE watcher LOGIN",
            "GRANT pg_monitor TO watcher",
        ],
    );
    let got = receiver.wait_for(Duration::from_secs(10), "the request", |r| r.len() == 1);
    let signature = got[0].header("webhook-signature").unwrap().to_string();
    eventually(Duration::from_secs(10), "the failure stored", || {
        one::<i64>(
            &mut db,
            "SELECT count(*) FROM marketing.pipeline_error_log WHERE stage = 'audit_note'",
        ) == 1
    });
    let stored = texts(
        &mut db,
        "SELECT coalesce(response_excerpt, '') || ' ' || coalesce(error, '') FROM marketing.pipeline_delivery_attempts
         UNION ALL
         SELECT error_message || ' ' || details::text FROM marketing.pipeline_error_log WHERE stage = 'audit_note'",
    )
    .join("\n");
    for secret in [
        "tok_live_hunter2222",
        signature.trim_start_matches("v1,"),
        "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    ] {
        assert!(!stored.contains(secret), "{secret} stored: {stored}");
    }
    assert!(stored.contains("[redacted]"), "{stored}");
    assert!(
        stored.contains("Secret Corp"),
        "the owner still reads the answer"
    );

    let mut watcher = cluster.connect("postgres", "watcher");
    let seen = texts(
        &mut watcher,
        "SELECT stage || ': ' || error_message || ' ' || details::text FROM marketing.vw_unresolved_errors ORDER BY stage",
    );
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(!seen.join(" ").contains("Secret Corp"), "{seen:?}");
    assert!(seen[0].starts_with("audit_note: HTTP 500 {"), "{seen:?}");
    assert!(seen[0].contains("\"status_code\": 500"), "{seen:?}");
    assert!(
        seen[1].starts_with("company_created: reported by the stage"),
        "{seen:?}"
    );
    // The endpoint's path may be its secret: monitoring sees the origin.
    assert!(!seen.join(" ").contains("/hook"), "{seen:?}");
    let url: String = one(&mut watcher, "SELECT url FROM marketing.vw_endpoint_health");
    assert_eq!(url, format!("http://127.0.0.1:{}/...", receiver.port));
    let url: String = one(&mut db, "SELECT url FROM marketing.vw_endpoint_health");
    assert_eq!(url, receiver.url("/hook"), "the owner sees it whole");
    let refused = watcher
        .batch_execute("SELECT response_excerpt FROM marketing.pipeline_delivery_attempts")
        .unwrap_err();
    assert_eq!(
        refused.code(),
        Some(&postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
    );
}

#[test]
fn the_owner_of_a_trigger_only_install_runs_nothing_an_app_role_planted() {
    let receiver = Receiver::ok();
    let cluster = Cluster::start("security-trigger-only", &[]);
    let mut admin = cluster.connect("postgres", "postgres");
    each(
        &mut admin,
        &[
            "CREATE ROLE app_owner LOGIN NOSUPERUSER NOCREATEROLE",
            "CREATE ROLE app LOGIN NOSUPERUSER",
            "CREATE DATABASE neon OWNER app_owner",
            "GRANT CREATE ON DATABASE neon TO app",
        ],
    );
    // The app role makes a schema named like the owner: "$user" comes first
    // in the owner's search_path.
    let mut app = cluster.connect("neon", "app");
    app.batch_execute("CREATE SCHEMA app_owner").unwrap();
    plant(&mut app, "app_owner", "app");
    app.batch_execute("GRANT USAGE ON SCHEMA app_owner TO PUBLIC")
        .unwrap();

    let script = repo_root().join("dist/pipeline_ext_trigger_only.sql");
    let out = cluster.psql("neon", "app_owner", &["-q", "-f", script.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut owner = cluster.connect("neon", "app_owner");
    assert_eq!(
        one::<String>(&mut owner, "SELECT pg_catalog.current_schemas(false)::text"),
        "{app_owner,public}"
    );
    use_the_pipeline(&mut owner, &receiver.url("/hook"));
    // The owner delivers as an outside consumer would.
    owner
        .batch_execute(
            "BEGIN; SELECT * FROM pipeline.claim(100); COMMIT;
             SELECT pipeline.mark_delivered_many(array_agg(id)) FROM marketing.pipeline_events
             WHERE status = 'processing';",
        )
        .unwrap();

    // The app role writes a stage table it was given: its event is made
    // with its rights, and it still reads no secret.
    owner
        .batch_execute(
            "GRANT USAGE ON SCHEMA intake TO app;
             GRANT INSERT ON intake.company_raw_intake TO app;",
        )
        .unwrap();
    app.batch_execute("INSERT INTO intake.company_raw_intake (company) VALUES ('From the app')")
        .unwrap();
    assert_eq!(
        one::<i64>(
            &mut owner,
            "SELECT pg_catalog.count(*) FROM marketing.pipeline_events
             WHERE event_type OPERATOR(pg_catalog.=) 'company_created'"
        ),
        2
    );
    assert!(app
        .query("SELECT secret FROM pipeline.webhook_credentials", &[])
        .is_err());

    // pipeline-relay delivers as the owner, whose search_path starts with
    // the planted schema: connecting, listening, claiming, recording,
    // reporting the backlog and stopping run none of it.
    let metrics = support::free_port();
    let mut relay = Relay::start(&[
        "--database-url",
        &format!(
            "postgres://app_owner@127.0.0.1:{}/neon?sslmode=disable",
            cluster.port
        ),
        "--listen",
        &format!("127.0.0.1:{metrics}"),
    ]);
    receiver.wait_for(Duration::from_secs(20), "the relay's delivery", |r| {
        r.iter()
            .any(|r| r.json()["data"]["new"]["company"] == "From the app")
    });
    app.batch_execute("INSERT INTO intake.company_raw_intake (company) VALUES ('While listening')")
        .unwrap();
    receiver.wait_for(Duration::from_secs(20), "the announced event", |r| {
        r.iter()
            .any(|r| r.json()["data"]["new"]["company"] == "While listening")
    });
    std::thread::sleep(Duration::from_secs(6)); // a backlog gauge refresh
    assert_eq!(relay.terminate(Duration::from_secs(20)).code(), Some(0));
    assert_eq!(
        one::<i64>(
            &mut owner,
            "SELECT pg_catalog.count(*) FROM marketing.pipeline_events
             WHERE status OPERATOR(pg_catalog.<>) 'processed' AND event_type OPERATOR(pg_catalog.=) 'company_created'"
        ),
        0
    );

    let (ran, stolen) = planted_effects(&mut owner, "app_owner");
    assert!(ran.is_empty(), "planted code ran: {ran:?}");
    assert_eq!(stolen, 0, "the owner's secrets were copied");
    assert_trap_springs(&mut app, "app_owner");
}

/// A role named pipeline_worker that someone made before CREATE EXTENSION
/// (to log in with the worker's rights, the webhook secrets among them) is
/// reset, and the log says what it had.
#[test]
fn a_pipeline_worker_role_made_beforehand_is_reset() {
    let cluster = Cluster::start(
        "security-worker-role-reset",
        &[("shared_preload_libraries", "pipeline_ext")],
    );
    let mut db = cluster.connect("postgres", "postgres");
    each(
        &mut db,
        &[
            "CREATE ROLE pipeline_worker LOGIN CREATEROLE PASSWORD 'known-to-me'",
            "CREATE EXTENSION pipeline_ext",
        ],
    );
    let attributes: String = one(
        &mut db,
        "SELECT format('%s %s %s %s', rolcanlogin, rolcreaterole, rolinherit, rolpassword IS NULL)
         FROM pg_authid WHERE rolname = 'pipeline_worker'",
    );
    assert_eq!(
        attributes, "f f f t",
        "no login, CREATEROLE, INHERIT or password"
    );
    assert!(cluster.log().contains(
        "role pipeline_worker existed with LOGIN, a password, CREATEROLE, INHERIT: reset to NOLOGIN"
    ));
    let refused = cluster
        .client("psql", "pipeline_worker")
        .args(["-X", "-d", "postgres", "-c", "SELECT 1"])
        .output()
        .unwrap();
    assert!(!refused.status.success(), "it cannot log in any more");
}

/// The rows of one domain are validated one at a time, under a lock only
/// roles that may validate can take: an advisory lock any role can take
/// (the key the validation once used, for one) holds up nothing.
#[test]
fn only_validators_can_hold_up_the_validation_of_a_domain() {
    let cluster = Cluster::with_worker("security-domain-lock", &[]);
    let mut db = cluster.connect("postgres", "postgres");
    each(
        &mut db,
        &[
            "CREATE ROLE validator LOGIN",
            "GRANT USAGE ON SCHEMA intake, marketing TO validator",
            "GRANT SELECT, UPDATE ON intake.company_raw_intake TO validator",
            "GRANT SELECT ON marketing.company_master TO validator",
            "CREATE ROLE squatter LOGIN",
            "INSERT INTO intake.company_raw_intake (id, company, website) VALUES
                 (1, 'Lock Co', 'https://lock.example'), (2, 'Lock Co', 'https://lock.example/about'),
                 (3, 'Lock Co', 'https://www.lock.example')",
        ],
    );
    let mut squatter = cluster.connect("postgres", "squatter");
    let refused = squatter
        .batch_execute("INSERT INTO pipeline.domain_locks VALUES ('lock.example')")
        .unwrap_err();
    let message = refused
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_default();
    assert!(message.contains("row-level security"), "{message}");
    squatter
        .batch_execute(
            "BEGIN; SELECT pg_advisory_xact_lock(hashtext('pipeline_ext: company domain'), hashtext('lock.example'))",
        )
        .unwrap();
    let mut first = cluster.connect("postgres", "validator");
    first.batch_execute("SET statement_timeout = '5s'").unwrap();
    let status: String = one(
        &mut first,
        "SELECT validation_status FROM pipeline.validate_company(1)",
    );
    assert_eq!(
        status, "valid",
        "not held up by the squatter's advisory lock"
    );

    // Two validators of one domain still take turns.
    first.batch_execute("BEGIN").unwrap();
    let status: String = one(
        &mut first,
        "SELECT validation_status FROM pipeline.validate_company(2)",
    );
    assert_eq!(status, "invalid", "a duplicate of row 1");
    let mut second = cluster.connect("postgres", "validator");
    second.batch_execute("SET lock_timeout = '500ms'").unwrap();
    let waited = second
        .batch_execute("SELECT * FROM pipeline.validate_company(3)")
        .unwrap_err();
    assert_eq!(
        waited.code(),
        Some(&postgres::error::SqlState::LOCK_NOT_AVAILABLE),
        "{waited}"
    );
    first.batch_execute("COMMIT").unwrap();
    let status: String = one(
        &mut second,
        "SELECT validation_status FROM pipeline.validate_company(3)",
    );
    assert_eq!(status, "invalid");
    squatter.batch_execute("ROLLBACK").unwrap();
}

/// Inside the worker's statements, session_user and current_user name its
/// role and is_superuser is off: code that asks who runs it (a trigger on
/// the attempt log, here) is told the truth.
#[test]
fn the_workers_statements_see_its_role_as_the_session() {
    let receiver = Receiver::ok();
    let cluster = Cluster::with_worker("security-session-user", &[]);
    let mut db = cluster.connect("postgres", "postgres");
    each(
        &mut db,
        &[
            "CREATE TABLE public.seen (is_superuser text, session_user_name name, current_user_name name)",
            "GRANT INSERT ON public.seen TO PUBLIC",
            "CREATE FUNCTION public.note_who() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 INSERT INTO public.seen VALUES (current_setting('is_superuser'), session_user, current_user);
                 RETURN NULL;
             END $$",
            "CREATE TRIGGER note_who AFTER INSERT ON marketing.pipeline_delivery_attempts
             FOR EACH STATEMENT EXECUTE FUNCTION public.note_who()",
            &format!(
                "SELECT pipeline.register_webhook('audit_note', '{}', allow_unknown_type => true)",
                receiver.url("/hook")
            ),
            "SELECT pipeline.emit('audit_note')",
        ],
    );
    eventually(Duration::from_secs(10), "the attempt recorded", || {
        one::<i64>(&mut db, "SELECT count(*) FROM public.seen") >= 1
    });
    let seen = texts(
        &mut db,
        "SELECT DISTINCT format('%s %s %s', is_superuser, session_user_name, current_user_name) FROM public.seen",
    );
    assert_eq!(seen, ["off pipeline_worker pipeline_worker"]);
}

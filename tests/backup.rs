//! pg_dump keeps the pipeline's data: the extension marks its tables and
//! sequences as configuration, so a dump restored into a new database holds
//! the same companies, events, errors and user watches, and new rows do not
//! collide with restored ones. Endpoint credentials (headers, signing
//! secrets) are left out of the dump and carried with export_registry.

mod support;

use support::{one, texts, Cluster};

const COUNTS: &str = "SELECT format('%s %s', t, n) FROM (
        SELECT 'intake' AS t, count(*) AS n FROM intake.company_raw_intake
        UNION ALL SELECT 'master', count(*) FROM marketing.company_master
        UNION ALL SELECT 'slots', count(*) FROM marketing.company_slots
        UNION ALL SELECT 'verifications', count(*) FROM marketing.email_verification
        UNION ALL SELECT 'events', count(*) FROM marketing.pipeline_events
        UNION ALL SELECT 'errors', count(*) FROM marketing.pipeline_error_log
        UNION ALL SELECT 'watches', count(*) FROM pipeline.watches
        UNION ALL SELECT 'user_watches', count(*) FROM pipeline.watches WHERE NOT builtin) c";

#[test]
fn dump_and_restore_keeps_the_pipeline() {
    let cluster = Cluster::start("backup", &[]);
    let mut admin = cluster.connect("postgres", "postgres");
    for db in ["source", "restored"] {
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .unwrap();
    }
    let mut source = cluster.connect("source", "postgres");
    source
        .batch_execute("CREATE EXTENSION pipeline_ext")
        .unwrap();
    source
        .batch_execute(
            "INSERT INTO intake.company_raw_intake (company, website)
             SELECT 'Company ' || n, 'https://c' || n || '.example' FROM generate_series(1, 5) n;
             UPDATE intake.company_raw_intake SET validated = true, validation_status = 'valid' WHERE id <= 3;
             INSERT INTO marketing.company_master (intake_id, company_name, website)
             SELECT id, company, website FROM intake.company_raw_intake WHERE validated;
             INSERT INTO marketing.company_slots (company_id, slot_role, email, enrichment_status)
             SELECT id, 'ceo', 'ceo@' || domain, 'enriched' FROM marketing.company_master;
             INSERT INTO marketing.email_verification (slot_id, email, result)
             SELECT id, email, 'valid' FROM marketing.company_slots;
             CREATE TABLE public.tickets (id int PRIMARY KEY, subject text);
             SELECT pipeline.watch('public.tickets', 'ticket_opened');
             INSERT INTO public.tickets VALUES (1, 'help');
             SELECT pipeline.log_error('validation', 'Clearbit timeout');
             SELECT * FROM pipeline.claim(3);
             SELECT pipeline.register_webhook('company_created', 'https://hooks.example/validate',
                 headers => '{\"Authorization\": \"Bearer sk-live-header-value\"}',
                 secret => 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw');;
             SELECT pipeline.set_service('apify', actor => 'someone~people-search', call_timeout_s => 120);
             SELECT pipeline.undeliver_type('ticket_opened', 'audit only');",
        )
        .unwrap();
    let before = texts(&mut source, COUNTS);
    // Carried apart from the dump, as docs/security.md says.
    let registry: String = one(&mut source, "SELECT pipeline.export_registry()::text");

    let dump = cluster.dump("source");
    let text = String::from_utf8_lossy(&dump);
    assert!(
        text.contains("https://hooks.example/validate"),
        "the endpoint is dumped"
    );
    for secret in ["MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "sk-live-header-value"] {
        assert!(!text.contains(secret), "{secret} is in the dump");
    }
    cluster.restore("restored", &dump);

    let mut restored = cluster.connect("restored", "postgres");
    assert_eq!(texts(&mut restored, COUNTS), before);
    // What was changed of the services and of the event types is kept.
    let services = "SELECT format('%s %s %s', service, coalesce(actor, '-'), call_timeout_s)
                    FROM pipeline.services_in_effect ORDER BY service";
    assert_eq!(texts(&mut restored, services), texts(&mut source, services));
    assert_eq!(
        texts(&mut restored, "SELECT event_type || ': ' || reason FROM pipeline.undelivered_types ORDER BY 1"),
        ["email_verified: the last stage's event: stage 7 (outreach ready) is the view marketing.vw_outreach_ready, nothing receives it", "ticket_opened: audit only"]
    );
    // The endpoint is back without its credentials: nothing is claimed for
    // it (it would go out unsigned), and verify() says what to do.
    assert_eq!(
        texts(
            &mut restored,
            "SELECT name || ': ' || status FROM pipeline.verify() WHERE status <> 'ok'"
        ),
        ["company_created: missing credentials (import them with pipeline.import_registry)"]
    );
    assert_eq!(
        one::<i64>(
            &mut restored,
            "SELECT count(*) FROM pipeline._claim_deliveries(100)"
        ),
        0
    );
    restored
        .execute(
            "SELECT * FROM pipeline.import_registry($1::text::jsonb)",
            &[&registry],
        )
        .unwrap();
    assert_eq!(
        one::<String>(&mut restored, "SELECT pipeline.export_registry()::text"),
        registry
    );
    assert_eq!(
        texts(
            &mut restored,
            "SELECT name FROM pipeline.verify() WHERE status <> 'ok'"
        ),
        Vec::<String>::new()
    );

    // New rows continue the sequences, and the restored watch still fires.
    let max_event: i64 = one(
        &mut restored,
        "SELECT max(id) FROM marketing.pipeline_events",
    );
    restored
        .batch_execute(
            "INSERT INTO intake.company_raw_intake (company) VALUES ('After Restore');
             INSERT INTO public.tickets VALUES (2, 'again');",
        )
        .unwrap();
    assert_eq!(
        texts(
            &mut restored,
            &format!("SELECT event_type FROM marketing.pipeline_events WHERE id > {max_event} ORDER BY id")
        ),
        ["company_created", "ticket_opened"]
    );
}

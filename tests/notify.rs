//! NOTIFY pipeline_event: every committed event is announced with a small
//! JSON payload, however large the row, and nothing is announced for a
//! transaction that rolls back.

mod support;

use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use support::Cluster;

#[test]
fn every_event_is_announced_with_a_small_payload() {
    let cluster = Cluster::start("notify", &[]);
    cluster
        .connect("postgres", "postgres")
        .batch_execute("CREATE EXTENSION pipeline_ext")
        .unwrap();

    let mut listener = cluster.connect("postgres", "postgres");
    listener.batch_execute("LISTEN pipeline_event").unwrap();

    let mut writer = cluster.connect("postgres", "postgres");
    // A row of several megabytes, with a name at the length limit.
    let id: i64 = writer
        .query_one(
            "INSERT INTO intake.company_raw_intake (company, raw)
             VALUES (repeat('Ж', 500), jsonb_build_object('blob', repeat('x', 3000000)))
             RETURNING id",
            &[],
        )
        .unwrap()
        .get(0);
    let mut tx = writer.transaction().unwrap();
    tx.batch_execute("INSERT INTO intake.company_raw_intake (company) VALUES ('Rolled Back')")
        .unwrap();
    tx.rollback().unwrap();
    writer
        .batch_execute("SELECT pipeline.emit('manual_check')")
        .unwrap();

    let received: Vec<_> = listener
        .notifications()
        .timeout_iter(Duration::from_secs(5))
        .take(3)
        .collect()
        .unwrap();
    assert_eq!(
        received.len(),
        2,
        "one per committed event, none for the rollback: {received:?}"
    );

    let first = &received[0];
    assert_eq!(first.channel(), "pipeline_event");
    assert!(
        first.payload().len() < 8000,
        "payload of {} bytes",
        first.payload().len()
    );
    let payload: serde_json::Value = serde_json::from_str(first.payload()).unwrap();
    let event_id: i64 = writer
        .query_one(
            "SELECT id FROM marketing.pipeline_events WHERE source_key = jsonb_build_object('id', $1::bigint)",
            &[&id],
        )
        .unwrap()
        .get(0);
    assert_eq!(payload["id"], event_id);
    assert_eq!(payload["event_type"], "company_created");
    assert_eq!(payload["table"], "intake.company_raw_intake");
    assert_eq!(payload["op"], "INSERT");

    let second: serde_json::Value = serde_json::from_str(received[1].payload()).unwrap();
    assert_eq!(second["event_type"], "manual_check");
    assert_eq!(second["op"], "EMIT");

    // One statement of many rows (written by one INSERT of the statement
    // trigger): an event and an announcement per row, in row order.
    let rows: Vec<i64> = writer
        .query(
            "INSERT INTO intake.company_raw_intake (company)
             SELECT 'Batch ' || n FROM generate_series(1, 50) n RETURNING id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let announced: Vec<i64> = listener
        .notifications()
        .timeout_iter(Duration::from_secs(5))
        .take(51)
        .collect::<Vec<_>>()
        .unwrap()
        .iter()
        .map(|n| {
            let payload: serde_json::Value = serde_json::from_str(n.payload()).unwrap();
            payload["id"].as_i64().unwrap()
        })
        .collect();
    let events: Vec<i64> = writer
        .query(
            "SELECT e.id FROM unnest($1::bigint[]) WITH ORDINALITY AS r(id, n)
             JOIN marketing.pipeline_events e ON e.source_key = jsonb_build_object('id', r.id)
             ORDER BY r.n",
            &[&rows],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(events.len(), 50, "one event per row");
    assert!(events.windows(2).all(|w| w[0] < w[1]), "in row order");
    assert_eq!(announced, events, "each announced once");
}

/// pipeline_wake: announced when an endpoint or its credentials change, and
/// for nothing else. Recording deliveries touches the endpoints table only
/// when one answered 410; a statement that changes no endpoint says nothing
/// (every NOTIFY queues behind the commits of every other).
#[test]
fn endpoint_changes_are_announced_and_nothing_else() {
    let cluster = Cluster::start("wake", &[]);
    let mut db = cluster.connect("postgres", "postgres");
    db.batch_execute("CREATE EXTENSION pipeline_ext").unwrap();
    let mut listener = cluster.connect("postgres", "postgres");
    listener.batch_execute("LISTEN pipeline_wake").unwrap();
    let heard = |listener: &mut postgres::Client| -> Vec<String> {
        listener
            .notifications()
            .timeout_iter(Duration::from_millis(500))
            .collect::<Vec<_>>()
            .unwrap()
            .iter()
            .map(|n| n.payload().to_string())
            .collect()
    };

    db.batch_execute(
        "SELECT pipeline.register_webhook('ping', 'http://127.0.0.1:9/ping', allow_unknown_type => true,
                                          enabled => false)",
    )
    .unwrap();
    assert!(
        !heard(&mut listener).is_empty(),
        "a registration is announced"
    );

    db.batch_execute("UPDATE pipeline.webhooks SET enabled = false WHERE false")
        .unwrap();
    // Deliveries recorded (one delivered, one to retry), as a deliverer does.
    db.batch_execute(
        "SELECT pipeline.emit('ping', jsonb_build_object('n', n)) FROM generate_series(1, 2) n;
         SELECT count(*) FROM pipeline.claim(2, NULL, ARRAY['ping'], 'test');
         SELECT count(*) FROM pipeline._record_deliveries(
             ARRAY(SELECT id FROM marketing.pipeline_events ORDER BY id), ARRAY[1, 1],
             ARRAY['delivered', 'retry'], ARRAY[204, 503], ARRAY[NULL, NULL], ARRAY[NULL, NULL]::integer[],
             ARRAY[1, 1], ARRAY[NULL, NULL], ARRAY['http://127.0.0.1:9/ping', 'http://127.0.0.1:9/ping'])",
    )
    .unwrap();
    assert_eq!(
        heard(&mut listener),
        Vec::<String>::new(),
        "no endpoint changed, nothing announced"
    );

    db.batch_execute("UPDATE pipeline.webhooks SET enabled = true")
        .unwrap();
    assert_eq!(heard(&mut listener), ["webhooks"], "enabling is announced");
}

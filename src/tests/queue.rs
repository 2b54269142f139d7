//! Queue operations: claim, mark_delivered, mark_failed, replay.

#[pgrx::pg_schema]
mod tests {
    use crate::tests::*;

    /// Emits n events of a type; returns their ids.
    fn emit(event_type: &str, n: usize) -> Vec<i64> {
        (0..n)
            .map(|i| {
                count(&format!(
                    "SELECT pipeline.emit('{event_type}', '{{\"n\": {i}}}')"
                ))
            })
            .collect()
    }

    fn status(id: i64) -> String {
        text(&format!(
            "SELECT status FROM marketing.pipeline_events WHERE id = {id}"
        ))
    }

    fn attempts(id: i64) -> i64 {
        count(&format!(
            "SELECT attempts::bigint FROM marketing.pipeline_events WHERE id = {id}"
        ))
    }

    fn claim(sql_args: &str) -> Vec<i64> {
        let ids = json(&format!(
            "SELECT coalesce(jsonb_agg(id ORDER BY id), '[]') FROM pipeline.claim({sql_args})"
        ));
        ids.as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect()
    }

    #[pg_test]
    fn queue_emit_makes_a_pending_event() {
        let id = count("SELECT pipeline.emit('manual_check', '{\"ok\": true}')");
        assert_eq!(status(id), "pending");
        assert_eq!(
            text(&format!(
                "SELECT source_op FROM marketing.pipeline_events WHERE id = {id}"
            )),
            "EMIT"
        );
        assert_error(
            "SELECT pipeline.emit('manual_check', NULL)",
            "payload must not be NULL",
        );
        assert_error(
            "SELECT pipeline.emit('Bad Type')",
            "invalid event type 'Bad Type'",
        );
    }

    #[pg_test]
    fn queue_claim_leases_due_events_in_order() {
        let ids = emit("ping", 5);
        let first = claim("batch_size => 3");
        assert_eq!(first, ids[..3]);
        for &id in &first {
            assert_eq!(status(id), "processing");
            assert_eq!(attempts(id), 1);
        }
        assert_eq!(
            count(&format!(
                "SELECT count(*) FROM marketing.pipeline_events
                 WHERE id = {} AND next_attempt_at = now() + interval '30 seconds'",
                first[0]
            )),
            1,
            "default lease is pipeline.lease_time (30s)"
        );
        assert_eq!(
            claim("batch_size => 10"),
            ids[3..],
            "leased events are not claimed twice"
        );
        assert!(claim("batch_size => 10").is_empty());

        // A consumer died: its lease runs out and the event is claimed again.
        run(&format!(
            "UPDATE marketing.pipeline_events SET next_attempt_at = now() - interval '1 second' WHERE id = {}",
            ids[0]
        ));
        assert_eq!(claim("10"), [ids[0]]);
        assert_eq!(attempts(ids[0]), 2);

        // The rows come back as the claim left them, not as they were.
        let id = emit("ping", 1)[0];
        assert_eq!(
            json(
                "SELECT jsonb_agg(jsonb_build_array(id, status, attempts, claimed_by))
                  FROM pipeline.claim(10, consumer => 'relay-1')"
            ),
            serde_json::json!([[id, "processing", 1, "relay-1"]])
        );
    }

    #[pg_test]
    fn queue_claim_filters_types_and_waits_for_due_time() {
        let pings = emit("ping", 2);
        let pongs = emit("pong", 2);
        run(&format!(
            "UPDATE marketing.pipeline_events SET next_attempt_at = now() + interval '1 hour' WHERE id = {}",
            pongs[1]
        ));
        assert_eq!(claim("10, event_types => '{pong}'"), [pongs[0]]);
        assert_eq!(claim("10, lease => '5 minutes'"), pings);
        assert_eq!(
            count(&format!(
                "SELECT count(*) FROM marketing.pipeline_events
                 WHERE id = {} AND next_attempt_at = now() + interval '5 minutes'",
                pings[0]
            )),
            1
        );
    }

    #[pg_test]
    fn queue_claim_takes_the_oldest_over_all_types_and_locks_no_more() {
        // Due times interleaved over three types: a0 b0 c0 a1 b1 c1 ...
        let mut order = Vec::new();
        for i in 0..4 {
            for t in ["type_a", "type_b", "type_c"] {
                let id = emit(t, 1)[0];
                run(&format!(
                    "UPDATE marketing.pipeline_events
                     SET next_attempt_at = now() - interval '1 hour' + {i} * interval '1 minute'
                                           + {} * interval '1 second'
                     WHERE id = {id}",
                    order.len() % 3
                ));
                order.push(id);
            }
        }
        let mut oldest = order[..5].to_vec();
        oldest.sort();
        assert_eq!(claim("5, event_types => '{type_a,type_b,type_c}'"), oldest);
        assert_eq!(claim("5"), {
            let mut next = order[5..10].to_vec();
            next.sort();
            next
        });
        // Only the claimed rows were locked: no waiting event carries this
        // transaction's lock.
        assert_eq!(
            count(
                "SELECT count(*) FROM marketing.pipeline_events
                 WHERE status = 'pending' AND xmax <> '0'::xid"
            ),
            0
        );
    }

    #[pg_test]
    fn queue_claim_rejects_bad_arguments() {
        assert_error(
            "SELECT * FROM pipeline.claim(0)",
            "batch_size must be between 1 and 10000, not 0",
        );
        assert_error("SELECT * FROM pipeline.claim(NULL)", "not NULL");
        assert_error("SELECT * FROM pipeline.claim(20000)", "not 20000");
        assert_error(
            "SELECT * FROM pipeline.claim(10, '-1 second')",
            "lease must be positive",
        );
    }

    #[pg_test]
    fn queue_mark_delivered() {
        let ids = emit("ping", 3);
        claim("10");
        assert_eq!(
            value::<bool>(&format!("SELECT pipeline.mark_delivered({})", ids[0])),
            Some(true)
        );
        assert_eq!(status(ids[0]), "processed");
        assert_eq!(
            count(&format!(
                "SELECT count(*) FROM marketing.pipeline_events WHERE id = {} AND processed_at IS NOT NULL",
                ids[0]
            )),
            1
        );
        assert_eq!(
            value::<bool>(&format!("SELECT pipeline.mark_delivered({})", ids[0])),
            Some(false),
            "already delivered"
        );
        assert_eq!(
            count(&format!(
                "SELECT count(*) FROM pipeline.mark_delivered_many(ARRAY[{}, {}])",
                ids[1], ids[2]
            )),
            2
        );
        assert_eq!(status(ids[2]), "processed");
        assert_error(
            "SELECT pipeline.mark_delivered(987654321)",
            "no event with id 987654321",
        );
        assert_error(
            &format!(
                "SELECT pipeline.mark_delivered_many(ARRAY[{}, 987654321, NULL])",
                ids[0]
            ),
            "event ids must not be NULL",
        );
        assert_error(
            &format!(
                "SELECT pipeline.mark_delivered_many(ARRAY[{}, 987654321])",
                ids[0]
            ),
            "no event with id 987654321",
        );
    }

    #[pg_test]
    fn queue_mark_failed_backs_off_then_dies() {
        run("SET LOCAL pipeline.max_attempts = 2");
        run("SET LOCAL pipeline.backoff_base = '10s'");
        let id = emit("ping", 1)[0];
        claim("10");
        assert_eq!(
            value::<String>(&format!(
                "SELECT pipeline.mark_failed({id}, 'HTTP 503 from receiver', details => '{{\"status_code\": 503}}')"
            )),
            Some("failed".into())
        );
        assert_eq!(status(id), "failed");
        let delay = value::<f64>(&format!(
            "SELECT extract(epoch FROM next_attempt_at - now())::float8 FROM marketing.pipeline_events WHERE id = {id}"
        ))
        .unwrap();
        assert!(
            (5.0..=10.0).contains(&delay),
            "first retry after 5-10 s, got {delay}"
        );
        assert_eq!(
            text(&format!(
                "SELECT last_error FROM marketing.pipeline_events WHERE id = {id}"
            )),
            "HTTP 503 from receiver"
        );
        let logged = json(&format!(
            "SELECT to_jsonb(l) FROM marketing.pipeline_error_log l WHERE event_id = {id}"
        ));
        assert_eq!(logged["stage"], "ping");
        assert_eq!(logged["details"]["status_code"], 503);
        assert_eq!(logged["details"]["attempt"], 1);

        assert!(claim("10").is_empty(), "not due before the backoff ends");
        run(&format!(
            "UPDATE marketing.pipeline_events SET next_attempt_at = now() WHERE id = {id}"
        ));
        assert_eq!(claim("10"), [id]);
        assert_eq!(
            value::<String>(&format!(
                "SELECT pipeline.mark_failed({id}, 'HTTP 503 again')"
            )),
            Some("dead".into()),
            "second of two attempts"
        );
        assert!(claim("10").is_empty(), "dead events are not claimed");
        assert_eq!(
            value::<String>(&format!("SELECT pipeline.mark_failed({id}, 'late report')")),
            None,
            "not processing: nothing changes"
        );
        assert_eq!(status(id), "dead");
        assert_eq!(
            count(&format!(
                "SELECT count(*) FROM marketing.pipeline_error_log WHERE event_id = {id}"
            )),
            2
        );
    }

    #[pg_test]
    fn queue_mark_failed_explicit_time_and_give_up() {
        let ids = emit("ping", 2);
        claim("10");
        run(&format!(
            "SELECT pipeline.mark_failed({}, 'rate limited', retry_at => now() + interval '42 seconds')",
            ids[0]
        ));
        assert_eq!(
            count(&format!(
                "SELECT count(*) FROM marketing.pipeline_events
                 WHERE id = {} AND next_attempt_at = now() + interval '42 seconds'",
                ids[0]
            )),
            1
        );
        assert_eq!(
            value::<String>(&format!(
                "SELECT pipeline.mark_failed({}, '410 Gone', retry => false)",
                ids[1]
            )),
            Some("dead".into())
        );
        assert_error(
            &format!("SELECT pipeline.mark_failed({}, '')", ids[0]),
            "error must describe",
        );
        assert_error(
            &format!("SELECT pipeline.mark_failed({}, NULL)", ids[0]),
            "error must describe",
        );
        assert_error(
            "SELECT pipeline.mark_failed(987654321, 'x')",
            "no event with id 987654321",
        );
    }

    #[pg_test]
    fn queue_replay_one_and_many() {
        let ids = emit("ping", 4);
        claim("10");
        for &id in &ids {
            run(&format!(
                "SELECT pipeline.mark_failed({id}, 'down', retry => false)"
            ));
        }
        assert_eq!(
            count(&format!("SELECT pipeline.replay({})", ids[0])),
            ids[0]
        );
        assert_eq!(status(ids[0]), "pending");
        assert_eq!(
            attempts(ids[0]),
            0,
            "a replayed event gets a full set of attempts"
        );
        assert_eq!(
            count(&format!(
                "SELECT replay_count::bigint FROM marketing.pipeline_events WHERE id = {}",
                ids[0]
            )),
            1
        );
        assert_eq!(
            count(&format!(
                "SELECT count(*) FROM marketing.pipeline_error_log WHERE event_id = {}",
                ids[0]
            )),
            1,
            "its error history stays"
        );
        assert_eq!(claim("10"), [ids[0]], "due immediately");

        assert_error(
            &format!("SELECT pipeline.replay({})", ids[0]),
            "being delivered right now",
        );
        assert_error(
            "SELECT pipeline.replay(987654321)",
            "no event with id 987654321",
        );
        assert_error(
            &format!("SELECT pipeline.replay_many(ARRAY[{}, 987654321])", ids[1]),
            "no event with id 987654321",
        );
        assert_eq!(status(ids[1]), "dead", "all or nothing");

        let replayed = count(&format!(
            "SELECT count(*) FROM pipeline.replay_many(ARRAY[{}, {}])",
            ids[1], ids[2]
        ));
        assert_eq!(replayed, 2);
        assert_eq!(status(ids[3]), "dead");
    }

    #[pg_test]
    fn queue_replay_failed_by_type_and_time() {
        let old = emit("ping", 1)[0];
        let recent = emit("ping", 1)[0];
        let other = emit("pong", 1)[0];
        claim("10");
        for id in [old, recent, other] {
            run(&format!(
                "SELECT pipeline.mark_failed({id}, 'down', retry => false)"
            ));
        }
        run(&format!(
            "UPDATE marketing.pipeline_events SET created_at = now() - interval '2 days' WHERE id = {old}"
        ));
        let replayed = json(
            "SELECT coalesce(jsonb_agg(r), '[]') FROM pipeline.replay_failed('ping', since => now() - interval '1 day') r",
        );
        assert_eq!(replayed, serde_json::json!([recent]));
        assert_eq!(status(old), "dead");
        assert_eq!(status(other), "dead");
        assert_eq!(count("SELECT count(*) FROM pipeline.replay_failed()"), 2);
        assert_eq!(count("SELECT count(*) FROM pipeline.replay_failed()"), 0);
        assert_error(
            "SELECT * FROM pipeline.replay_failed(since => now(), until => now() - interval '1 day')",
            "is after until",
        );
        assert_error(
            "SELECT * FROM pipeline.replay_failed('No Such Type')",
            "invalid event type",
        );
    }
}

//! The stage and monitoring views.

#[pgrx::pg_schema]
mod tests {
    use crate::tests::*;
    use serde_json::json;

    #[pg_test]
    fn views_funnel_counts_every_stage() {
        // Ten companies arrive; six are validated, four promoted; three get
        // slots, two of them an enriched contact, one a verified email.
        for i in 0..10 {
            run(&format!(
                "INSERT INTO intake.company_raw_intake (company, website) VALUES ('Co {i}', 'https://co{i}.example')"
            ));
        }
        run(
            "UPDATE intake.company_raw_intake SET validated = true, validation_status = 'valid'
             WHERE id IN (SELECT id FROM intake.company_raw_intake ORDER BY id LIMIT 6)",
        );
        run("INSERT INTO marketing.company_master (intake_id, company_name, website)
             SELECT id, company, website FROM intake.company_raw_intake WHERE validated ORDER BY id LIMIT 4");
        run("INSERT INTO marketing.company_slots (company_id, slot_role)
             SELECT c.id, r.role FROM (SELECT id FROM marketing.company_master ORDER BY id LIMIT 3) c
             CROSS JOIN (VALUES ('ceo'), ('cfo')) AS r(role)");
        run("UPDATE marketing.company_slots SET enrichment_status = 'enriched', email = slot_role || '@x.example'
             WHERE company_id IN (SELECT id FROM marketing.company_master ORDER BY id LIMIT 2)");
        run(
            "INSERT INTO marketing.email_verification (slot_id, email, result)
             SELECT id, email, CASE WHEN slot_role = 'ceo' THEN 'valid' ELSE 'invalid' END
             FROM marketing.company_slots
             WHERE company_id = (SELECT min(id) FROM marketing.company_master)",
        );

        let funnel = json(
            "SELECT jsonb_agg(jsonb_build_array(stage_no, stage, event_type, companies, contacts) ORDER BY stage_no)
             FROM marketing.vw_pipeline_funnel",
        );
        assert_eq!(
            funnel,
            json!([
                [1, "intake", "company_created", 10, null],
                [2, "validation", "company_validated", 6, null],
                [3, "promotion", "company_promoted", 4, null],
                [4, "slots", "slots_created", 3, 6],
                [5, "enrichment", "contact_enriched", 2, 4],
                [6, "verification", "email_verified", 1, 2],
                [7, "outreach_ready", null, 1, 1]
            ])
        );
    }

    #[pg_test]
    fn views_pending_events_by_type() {
        for _ in 0..3 {
            run("SELECT pipeline.emit('ping')");
        }
        run("SELECT pipeline.emit('pong')");
        run("SELECT * FROM pipeline.claim(1, event_types => '{ping}')");
        run("UPDATE marketing.pipeline_events SET status = 'failed', next_attempt_at = now() + interval '1 minute'
             WHERE id = (SELECT max(id) FROM marketing.pipeline_events WHERE event_type = 'ping')");
        run(
            "UPDATE marketing.pipeline_events SET created_at = now() - interval '5 minutes'
             WHERE id = (SELECT min(id) FROM marketing.pipeline_events WHERE event_type = 'ping')",
        );

        let ping =
            json("SELECT to_jsonb(v) FROM marketing.vw_pending_events v WHERE event_type = 'ping'");
        assert_eq!(ping["pending"], 1);
        assert_eq!(ping["processing"], 1);
        assert_eq!(ping["failed"], 1);
        assert_eq!(ping["due_now"], 1);
        assert_eq!(
            text("SELECT oldest_age::text FROM marketing.vw_pending_events WHERE event_type = 'ping'"),
            "00:05:00"
        );
        let pong =
            json("SELECT to_jsonb(v) FROM marketing.vw_pending_events v WHERE event_type = 'pong'");
        assert_eq!(pong["pending"], 1);

        run("SELECT * FROM pipeline.claim(10)");
        run("SELECT pipeline.mark_delivered_many(array_agg(id)) FROM marketing.pipeline_events WHERE status = 'processing'");
        assert_eq!(
            count("SELECT count(*) FROM marketing.vw_pending_events WHERE event_type = 'pong'"),
            0,
            "delivered events are not pending"
        );
    }

    #[pg_test]
    fn views_processing_latency_avg_and_p95() {
        // 20 delivered events taking 10, 20, ..., 200 ms.
        run("INSERT INTO marketing.pipeline_events (event_type, payload, status, created_at, processed_at)
             SELECT 'ping', '{}', 'processed', now() - interval '1 hour',
                    now() - interval '1 hour' + i * interval '10 milliseconds'
             FROM generate_series(1, 20) AS i");
        run("INSERT INTO marketing.pipeline_events (event_type, payload, status, created_at, processed_at)
             VALUES ('ping', '{}', 'processed', now() - interval '3 days', now() - interval '3 days' + interval '9 hours')");
        let latency = json(
            "SELECT to_jsonb(v) FROM marketing.vw_processing_latency v WHERE event_type = 'ping'",
        );
        assert_eq!(latency["delivered"], 20, "only the last 24 hours");
        assert_eq!(latency["avg_ms"], 105.0);
        assert_eq!(latency["p50_ms"], 105.0);
        assert_eq!(latency["p95_ms"], 190.5);
        assert_eq!(latency["max_ms"], 200.0);
    }
}

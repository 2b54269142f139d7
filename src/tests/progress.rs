//! Where every company stands (sql/012_progress.sql), and event types
//! recorded without delivery.

#[pgrx::pg_schema]
mod tests {
    use crate::tests::*;
    use serde_json::json;

    fn progress() -> serde_json::Value {
        json(
            "SELECT coalesce(jsonb_agg(jsonb_build_object('company', company, 'slot', slot_role, 'stage', stage,
                                                          'state', state, 'reason', reason)
                                       ORDER BY company, slot_role), '[]')
             FROM marketing.vw_work_progress",
        )
    }

    #[pg_test]
    fn every_company_has_a_place_and_a_reason() {
        run("SELECT pipeline.register_webhook(t, 'https://receiver.example/' || t)
             FROM unnest(ARRAY['company_created', 'company_validated', 'company_promoted', 'slots_created',
                               'contact_enriched']) t");
        run("INSERT INTO intake.company_raw_intake (company, website) VALUES
                 ('Waiting', 'https://waiting.example'), ('Nowhere', 'see linkedin'), ('Found', 'https://found.example')");
        run("SELECT pipeline.validate_company(id) FROM intake.company_raw_intake WHERE company IN ('Nowhere', 'Found')");
        let company = count("SELECT pipeline.promote_company(id) FROM intake.company_raw_intake WHERE company = 'Found'");
        run(&format!("SELECT pipeline.create_slots({company})"));
        let ceo = count(&format!("SELECT id FROM marketing.company_slots WHERE company_id = {company} AND slot_role = 'ceo'"));
        let cfo = count(&format!("SELECT id FROM marketing.company_slots WHERE company_id = {company} AND slot_role = 'cfo'"));
        run(&format!(
            "SELECT pipeline.record_enrichment({ceo}, '[{{\"full_name\": \"Ada\", \"email\": \"ada@found.example\"}}]')"
        ));
        run(&format!("SELECT pipeline.record_enrichment({cfo}, '[]')"));
        run(&format!(
            "SELECT pipeline.record_verification({ceo}, '{{\"email\": \"ada@found.example\", \"result\": \"ok\", \"quality\": \"good\"}}')"
        ));
        assert_eq!(
            progress(),
            json!([
                {"company": "Found", "slot": "ceo", "stage": "outreach_ready", "state": "done", "reason": null},
                {"company": "Found", "slot": "cfo", "stage": "enrichment", "state": "failed", "reason": "nobody found for cfo"},
                {"company": "Nowhere", "slot": null, "stage": "validation", "state": "failed",
                 "reason": "invalid: website is not an http(s) URL or a domain name"},
                {"company": "Waiting", "slot": null, "stage": "validation", "state": "in_progress", "reason": null}
            ])
        );

        // Stuck: no event for it any more, and not moved for pipeline.stuck_after.
        run(
            "DELETE FROM marketing.pipeline_events WHERE event_type = 'company_created'
                 AND (payload -> 'new' ->> 'company') = 'Waiting'",
        );
        run("UPDATE intake.company_raw_intake SET created_at = now() - interval '2 hours' WHERE company = 'Waiting'");
        let stuck = json(
            "SELECT jsonb_agg(to_jsonb(s) - 'since' - 'stuck_for') FROM marketing.vw_stuck_work s",
        );
        assert_eq!(stuck[0]["company"], "Waiting");
        assert_eq!(stuck[0]["stage"], "validation");
        assert_eq!(stuck[0]["waiting_for"], "company_created");
        assert!(
            stuck[0]["reason"]
                .as_str()
                .unwrap()
                .starts_with("no company_created event waits or fails for it"),
            "{stuck}"
        );
        assert_eq!(count("SELECT stuck_work FROM pipeline.status()"), 1);
        let warned = text("SELECT status FROM pipeline.verify() WHERE kind = 'work'");
        assert!(warned.starts_with("1 stuck"), "{warned}");
        // A longer setting: not stuck yet.
        run("SET LOCAL pipeline.stuck_after = '3h'");
        assert_eq!(count("SELECT count(*) FROM marketing.vw_stuck_work"), 0);
        run("RESET pipeline.stuck_after");

        // Resumed: the stage's event is written again, as its trigger writes it.
        let intake = count("SELECT id FROM intake.company_raw_intake WHERE company = 'Waiting'");
        let resumed = json(&format!(
            "SELECT jsonb_agg(to_jsonb(r)) FROM pipeline.resume_company(intake_id => {intake}) r"
        ));
        assert_eq!(resumed[0]["event_type"], "company_created");
        let event = resumed[0]["event_id"].as_i64().unwrap();
        assert_eq!(
            json(&format!(
                "SELECT payload -> 'new' -> 'id' FROM marketing.pipeline_events WHERE id = {event}"
            )),
            json!(intake)
        );
        assert_eq!(count("SELECT count(*) FROM marketing.vw_stuck_work"), 0);
        // Moving already: nothing written twice.
        let again = json(&format!(
            "SELECT jsonb_agg(r.detail) FROM pipeline.resume_company(intake_id => {intake}) r"
        ));
        assert_eq!(
            again,
            json!(["moving already: an event waits or is being delivered"])
        );
        // A dead event: stuck at once, with its error.
        run(&format!(
            "UPDATE marketing.pipeline_events SET status = 'dead', last_error = 'HTTP 424: no credits' WHERE id = {event}"
        ));
        let reason = text("SELECT reason FROM marketing.vw_stuck_work");
        assert_eq!(
            reason,
            format!("company_created event {event} is dead: HTTP 424: no credits")
        );
        assert_error(
            "SELECT * FROM pipeline.resume_company()",
            "give intake_id or company_id",
        );
        assert_error(
            "SELECT * FROM pipeline.resume_company(intake_id => -1)",
            "no company with intake_id -1",
        );

        // The funnel: arrived = done + in progress + failed + stuck, per stage.
        let funnel = json(
            "SELECT jsonb_object_agg(stage, jsonb_build_array(arrived, in_progress, done, failed, stuck))
             FROM marketing.vw_pipeline_funnel",
        );
        assert_eq!(funnel["validation"], json!([3, 0, 1, 1, 1]));
        // The reasons by kind, with no company's data in them.
        let reasons = json(
            "SELECT jsonb_object_agg(stage, failure_reasons) FROM marketing.vw_pipeline_funnel
             WHERE failure_reasons <> '{}'",
        );
        assert_eq!(
            reasons,
            json!({
                "validation": {"invalid: website is not an http(s) URL or a domain name": 1, "event dead": 1},
                "enrichment": {"nobody found": 1}
            })
        );
        assert_eq!(funnel["enrichment"], json!([2, 0, 1, 1, 0]));
        assert_eq!(funnel["outreach_ready"], json!([1, 0, 1, 0, 0]));
    }

    #[pg_test]
    fn a_2xx_that_recorded_nothing_is_stuck_at_once() {
        run("INSERT INTO intake.company_raw_intake (company, website) VALUES ('Lied To', 'https://lied.example')");
        assert_eq!(count("SELECT count(*) FROM marketing.vw_stuck_work"), 0);
        // The receiver answered 200 (n8n while it starts up) and did nothing.
        let event =
            count("SELECT id FROM marketing.pipeline_events WHERE event_type = 'company_created'");
        run(&format!(
            "UPDATE marketing.pipeline_events SET status = 'processed', processed_at = now(), attempts = 1
             WHERE id = {event}"
        ));
        let stuck = json("SELECT jsonb_agg(jsonb_build_array(company, stage, reason, event_id)) FROM marketing.vw_stuck_work");
        assert_eq!(
            stuck,
            json!([[
                "Lied To",
                "validation",
                format!(
                    "company_created event {event} was answered 2xx, but its work is not recorded"
                ),
                event
            ]])
        );
        // Resumed, it waits again; done, it is no longer stuck.
        run("SELECT pipeline.resume_stuck()");
        assert_eq!(count("SELECT count(*) FROM marketing.vw_stuck_work"), 0);
        run("SELECT pipeline.validate_company(id) FROM intake.company_raw_intake");
        run("UPDATE marketing.pipeline_events SET status = 'processed', processed_at = now(), attempts = 1
             WHERE event_type = 'company_created'");
        assert_eq!(
            text("SELECT state FROM marketing.vw_work_progress WHERE company = 'Lied To'"),
            "in_progress"
        );
    }

    /// Many rows answered at once (a bulk import whose events were all
    /// delivered before any receiver recorded its work) are found by one
    /// pass over the events, each with its own event; those whose event
    /// waits are not stuck.
    #[pg_test]
    fn a_bulk_import_answered_2xx_with_nothing_recorded_is_stuck_row_by_row() {
        run("INSERT INTO intake.company_raw_intake (company, website)
             SELECT 'Bulk ' || g, 'https://bulk' || g || '.example' FROM generate_series(1, 30) g");
        run("UPDATE marketing.pipeline_events SET status = 'processed', processed_at = now(), attempts = 1
             WHERE event_type = 'company_created' AND payload -> 'new' ->> 'company' <> ALL (ARRAY['Bulk 1', 'Bulk 2'])");
        let stuck = json(
            "SELECT jsonb_build_array(count(*), count(*) FILTER (
                        WHERE w.reason = format('company_created event %s was answered 2xx, but its work is not recorded', e.id)
                          AND w.event_id = e.id))
             FROM marketing.vw_stuck_work w
             JOIN marketing.pipeline_events e
               ON e.event_type = 'company_created' AND (e.payload -> 'new' ->> 'id')::bigint = w.intake_id",
        );
        assert_eq!(stuck, json!([28, 28]));
        assert_eq!(
            json(
                "SELECT jsonb_agg(state ORDER BY company) FROM marketing.vw_work_progress
                  WHERE company IN ('Bulk 1', 'Bulk 2')"
            ),
            json!(["in_progress", "in_progress"])
        );
        // The same rows looked up one by one (20 or fewer) say the same.
        run(
            "UPDATE marketing.pipeline_events SET status = 'pending', processed_at = NULL
             WHERE event_type = 'company_created' AND (payload -> 'new' ->> 'id')::bigint % 3 <> 0",
        );
        let alone = count("SELECT count(*) FROM marketing.vw_stuck_work
                           WHERE reason LIKE 'company_created event % was answered 2xx, but its work is not recorded'");
        let answered = count(
            "SELECT count(*) FROM marketing.pipeline_events
                              WHERE event_type = 'company_created' AND status = 'processed'",
        );
        assert!(answered <= 20, "{answered}");
        assert_eq!(alone, answered);
    }

    #[pg_test]
    fn event_types_without_delivery_end_and_are_not_waiting_work() {
        assert_error(
            "SELECT pipeline.register_webhook('email_verified', 'https://receiver.example/verified')",
            "event_type 'email_verified' is recorded without delivery",
        );
        assert_error(
            "SELECT * FROM pipeline.import_registry('{\"base_url\": \"https://r.example\", \"webhooks\": {\"email_verified\": \"/x\"}}')",
            "recorded without delivery",
        );
        run("SELECT pipeline.register_webhook('company_created', 'https://receiver.example/validate')");
        assert_error(
            "SELECT pipeline.undeliver_type('company_created', 'audit only')",
            "event_type 'company_created' has an endpoint",
        );
        assert_error(
            "SELECT pipeline.undeliver_type('company_promoted', ' ')",
            "reason must say why",
        );

        let company = promoted_company("Verified", "verified.example");
        run(&format!(
            "SELECT pipeline.create_slots({company}, '{{ceo}}')"
        ));
        run(&format!(
            "SELECT pipeline.record_enrichment(s.id, '[{{\"full_name\": \"V\", \"email\": \"v@verified.example\"}}]'),
                    pipeline.record_verification(s.id, '{{\"email\": \"v@verified.example\", \"result\": \"ok\"}}')
             FROM marketing.company_slots s WHERE s.company_id = {company}"
        ));
        assert_eq!(events_of("email_verified").len(), 1);
        // Not waiting work, and not waiting for an endpoint either.
        let open: i64 = count(
            "SELECT count(*) FROM marketing.pipeline_events WHERE status IN ('pending', 'failed')",
        );
        assert_eq!(
            count("SELECT pending + failed + without_endpoint FROM pipeline.status()"),
            open - 1
        );
        // The deliverer's purge settles it, even when everything is kept.
        assert_eq!(count("SELECT pipeline.purge(interval '0')"), 1);
        let settled = &events_of("email_verified")[0];
        assert_eq!(settled["status"], "processed");
        assert_eq!(settled["attempts"], 0);
        assert_eq!(settled["processed_at"], settled["created_at"]);
        assert_eq!(count("SELECT count(*) FROM marketing.vw_processing_latency WHERE event_type = 'email_verified'"), 0);
        // The funnel counts the rows they are about all the same.
        assert_eq!(
            count("SELECT contacts FROM marketing.vw_pipeline_funnel WHERE stage = 'verification'"),
            1
        );
        // A user's audit-only type, and back.
        run("SELECT pipeline.undeliver_type('company_promoted', 'audit only')");
        assert!(value::<bool>("SELECT pipeline.deliver_type('company_promoted')").unwrap());
        assert!(!value::<bool>("SELECT pipeline.deliver_type('company_promoted')").unwrap());
    }
}

//! The error log, its functions and its views.

#[pgrx::pg_schema]
mod tests {
    use crate::tests::*;

    fn unresolved() -> i64 {
        count("SELECT count(*) FROM marketing.vw_unresolved_errors")
    }

    #[pg_test]
    fn errors_log_and_resolve_one() {
        let event = count("SELECT pipeline.emit('company_created')");
        let id = count(&format!(
            "SELECT pipeline.log_error('validation', 'Clearbit API timeout', {event}, '{{\"http\": 504}}')"
        ));
        assert_eq!(unresolved(), 1);
        let row = json(&format!(
            "SELECT to_jsonb(v) FROM marketing.vw_unresolved_errors v WHERE id = {id}"
        ));
        assert_eq!(row["stage"], "validation");
        assert_eq!(row["event_id"], event);
        assert_eq!(row["event_status"], "pending");
        assert_eq!(row["error_message"], "Clearbit API timeout");
        assert_eq!(row["details"]["http"], 504);

        assert_eq!(
            value::<bool>(&format!(
                "SELECT pipeline.resolve_error({id}, 'retried by hand')"
            )),
            Some(true)
        );
        assert_eq!(unresolved(), 0);
        assert_eq!(
            text(&format!(
                "SELECT resolution_note FROM marketing.pipeline_error_log WHERE id = {id} AND resolved_at IS NOT NULL"
            )),
            "retried by hand"
        );
        assert_eq!(
            value::<bool>(&format!("SELECT pipeline.resolve_error({id})")),
            Some(false),
            "already resolved"
        );
        assert_error(
            "SELECT pipeline.resolve_error(987654321)",
            "no error with id 987654321",
        );
        assert_error(
            "SELECT pipeline.resolve_error(NULL)",
            "no error with id NULL",
        );
    }

    #[pg_test]
    fn errors_resolve_many_by_stage_and_time() {
        for stage in ["validation", "validation", "enrichment"] {
            run(&format!(
                "SELECT pipeline.log_error('{stage}', 'quota exceeded')"
            ));
        }
        run(
            "UPDATE marketing.pipeline_error_log SET created_at = now() - interval '2 hours'
             WHERE id = (SELECT min(id) FROM marketing.pipeline_error_log)",
        );
        assert_eq!(
            count("SELECT pipeline.resolve_errors('validation', before => now() - interval '1 hour')::bigint"),
            1
        );
        assert_eq!(
            count("SELECT pipeline.resolve_errors('validation')::bigint"),
            1
        );
        assert_eq!(unresolved(), 1);
        assert_eq!(count("SELECT pipeline.resolve_errors()::bigint"), 1);
        assert_eq!(unresolved(), 0);
    }

    #[pg_test]
    fn errors_log_rejects_bad_input() {
        let before = count("SELECT count(*) FROM marketing.pipeline_error_log");
        assert_error("SELECT pipeline.log_error(NULL, 'x')", "stage must name");
        assert_error("SELECT pipeline.log_error(' ', 'x')", "stage must name");
        assert_error(
            "SELECT pipeline.log_error('validation', '')",
            "error must describe",
        );
        assert_error(
            "SELECT pipeline.log_error('validation', 'x', 987654321)",
            "no event with id 987654321",
        );
        assert_eq!(
            count("SELECT count(*) FROM marketing.pipeline_error_log"),
            before
        );
    }

    #[pg_test]
    fn errors_rate_24h() {
        let events: Vec<i64> = (0..4)
            .map(|_| count("SELECT pipeline.emit('company_validated')"))
            .collect();
        run(&format!(
            "SELECT pipeline.log_error('company_validated', 'boom', {})",
            events[0]
        ));
        run(&format!(
            "SELECT pipeline.log_error('company_validated', 'boom again', {})",
            events[0]
        ));
        run(&format!(
            "SELECT pipeline.log_error('company_validated', 'other', {})",
            events[1]
        ));
        run("SELECT pipeline.log_error('company_validated', 'old', NULL)");
        run("UPDATE marketing.pipeline_error_log SET created_at = now() - interval '25 hours' WHERE error_message = 'old'");
        run("SELECT pipeline.log_error('receiver', 'n8n down')");

        let rate = json(
            "SELECT to_jsonb(r) FROM marketing.vw_error_rate_24h r WHERE stage = 'company_validated'",
        );
        assert_eq!(rate["events"], 4);
        assert_eq!(
            rate["errors"], 3,
            "the 25-hour-old error is outside the window"
        );
        assert_eq!(rate["unresolved"], 3);
        assert_eq!(rate["failed_events"], 2);
        assert_eq!(rate["failed_event_pct"], 50.0);

        let receiver =
            json("SELECT to_jsonb(r) FROM marketing.vw_error_rate_24h r WHERE stage = 'receiver'");
        assert_eq!(receiver["events"], 0);
        assert_eq!(receiver["errors"], 1);
        assert!(receiver["failed_event_pct"].is_null());
    }
}

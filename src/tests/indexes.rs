//! With a long delivered history, claiming and the monitoring views read
//! indexes instead of scanning every event.

#[pgrx::pg_schema]
mod tests {
    use crate::tests::*;

    /// Relations that the plan of `query` reads with a sequential scan.
    fn seq_scans(query: &str) -> Vec<String> {
        fn walk(node: &serde_json::Value, found: &mut Vec<String>) {
            if node["Node Type"] == "Seq Scan" {
                found.push(node["Relation Name"].as_str().unwrap_or("?").to_string());
            }
            for child in node["Plans"].as_array().into_iter().flatten() {
                walk(child, found);
            }
        }
        let plan = value::<pgrx::Json>(&format!("EXPLAIN (FORMAT JSON) {query}"))
            .unwrap()
            .0;
        let mut found = Vec::new();
        walk(&plan[0]["Plan"], &mut found);
        found
    }

    #[pg_test]
    fn indexes_serve_claims_and_views_over_a_long_history() {
        run("INSERT INTO marketing.pipeline_events (event_type, payload, status, created_at, processed_at)
             SELECT 'company_created', '{}', 'processed', now() - n * interval '10 seconds',
                    now() - n * interval '10 seconds' + interval '20 ms'
             FROM generate_series(1, 200000) AS n");
        run("SELECT pipeline.emit('company_created') FROM generate_series(1, 50)");
        run("ANALYZE marketing.pipeline_events");

        for query in [
            // the row selection of pipeline.claim, for one type
            "SELECT e.id FROM marketing.pipeline_events e
             WHERE e.event_type = 'company_created' AND e.status IN ('pending', 'failed', 'processing')
               AND e.next_attempt_at <= now()
             ORDER BY e.next_attempt_at, e.id LIMIT 100",
            // and how it finds the types with open events
            "SELECT min(e.event_type::text) FROM marketing.pipeline_events e
             WHERE e.status IN ('pending', 'failed', 'processing') AND e.event_type > 'a'",
            "SELECT * FROM marketing.vw_pending_events",
            "SELECT * FROM marketing.vw_processing_latency",
            "SELECT * FROM marketing.vw_error_rate_24h",
            "SELECT * FROM marketing.pipeline_events ORDER BY created_at DESC LIMIT 20",
        ] {
            let scans = seq_scans(query);
            assert!(
                !scans.iter().any(|r| r == "pipeline_events"),
                "{query}\n  scans all of pipeline_events"
            );
        }
        assert_eq!(count("SELECT count(*) FROM pipeline.claim(100)"), 50);
    }
}

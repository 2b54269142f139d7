//! The stage work's calls to the services (sql/010_service_calls.sql): what
//! each answer means for the delivery, leases, the one answer of a delivery.

#[pgrx::pg_schema]
mod tests {
    use crate::tests::*;
    use serde_json::json;

    /// A promoted company with its ceo and cfo slots: (ceo, cfo).
    fn two_slots(name: &str, domain: &str) -> (i64, i64) {
        let company = promoted_company(name, domain);
        run(&format!("SELECT pipeline.create_slots({company})"));
        let ids = json(&format!(
            "SELECT jsonb_agg(id ORDER BY slot_role) FROM marketing.company_slots WHERE company_id = {company}"
        ));
        (ids[0].as_i64().unwrap(), ids[1].as_i64().unwrap())
    }

    fn calls(function: &str, slots: &[i64]) -> Vec<serde_json::Value> {
        let ids: Vec<String> = slots.iter().map(i64::to_string).collect();
        json(&format!(
            "SELECT jsonb_agg(to_jsonb(c) ORDER BY c.slot_id) FROM pipeline.{function}('{{{}}}') c",
            ids.join(",")
        ))
        .as_array()
        .cloned()
        .unwrap()
    }

    fn finish(
        stage: &str,
        slot: i64,
        status: &str,
        body: &str,
        retry_after: &str,
        error: &str,
    ) -> serde_json::Value {
        json(&format!(
            "SELECT to_jsonb(f) FROM pipeline.finish_call('{stage}', {slot}, {status}, {body}, {retry_after}, {error}) f"
        ))
    }

    fn answer(stage: &str, slots: &[i64]) -> serde_json::Value {
        let ids: Vec<String> = slots.iter().map(i64::to_string).collect();
        json(&format!(
            "SELECT to_jsonb(a) FROM pipeline.stage_answer('{stage}', '{{{}}}') a",
            ids.join(",")
        ))
    }

    #[pg_test]
    fn enrichment_calls_are_leased_and_built_from_the_services_table() {
        let (ceo, cfo) = two_slots("Lease", "lease.example");
        let first = calls("enrichment_calls", &[ceo, cfo, -5]);
        assert_eq!(first[0]["slot_id"], -5);
        assert_eq!(first[0]["action"], "missing");
        assert_eq!(first[1]["action"], "call");
        assert_eq!(first[1]["method"], "POST");
        assert_eq!(
            first[1]["url"],
            "https://api.apify.com/v2/acts/code_crafter~leads-finder/run-sync-get-dataset-items"
        );
        assert_eq!(
            first[1]["query"],
            json!({"timeout": "240", "maxItems": "1"})
        );
        assert_eq!(
            first[1]["body"],
            json!({"company_domain": ["lease.example"], "contact_job_title": ["CEO", "Chief Executive Officer", "Founder"],
                   "fetch_count": 1})
        );
        assert_eq!(
            first[2]["body"]["contact_job_title"],
            json!(["CFO", "Chief Financial Officer"])
        );
        // A second delivery of the same event while the calls are out: busy,
        // and answered 409 so that it is tried again later.
        let again = calls("enrichment_calls", &[ceo, cfo]);
        assert!(again.iter().all(|c| c["action"] == "busy"), "{again:?}");
        assert_eq!(answer("enrichment", &[ceo, cfo])["status"], 409);
        assert_eq!(
            count(&format!(
                "SELECT calls FROM pipeline.service_calls WHERE slot_id = {ceo}"
            )),
            1
        );

        // One part recorded, the other turned away: 429 with the service's wait.
        let done = finish(
            "enrichment",
            ceo,
            "200",
            r#"'[{"full_name": "Ada Lovelace", "job_title": "CEO", "email": "ada@lease.example", "linkedin": "https://l.example/ada", "mobile_number": "+1 555"}]'"#,
            "NULL",
            "NULL",
        );
        assert_eq!(done["status"], 200);
        assert_eq!(done["outcome"], "enriched");
        let slot = json(&format!(
            "SELECT to_jsonb(s) FROM marketing.company_slots s WHERE id = {ceo}"
        ));
        assert_eq!(
            (
                slot["full_name"].as_str(),
                slot["title"].as_str(),
                slot["email"].as_str(),
                slot["linkedin_url"].as_str(),
                slot["phone"].as_str()
            ),
            (
                Some("Ada Lovelace"),
                Some("CEO"),
                Some("ada@lease.example"),
                Some("https://l.example/ada"),
                Some("+1 555")
            )
        );
        let turned_away = finish(
            "enrichment",
            cfo,
            "429",
            "'{\"error\": {\"type\": \"rate-limit-exceeded\"}}'",
            "' 7 '",
            "NULL",
        );
        assert_eq!(
            (
                turned_away["status"].as_i64(),
                turned_away["retry_after"].as_i64()
            ),
            (Some(429), Some(7))
        );
        let delivery = answer("enrichment", &[ceo, cfo]);
        assert_eq!(
            (
                delivery["status"].as_i64(),
                delivery["retry_after"].as_i64()
            ),
            (Some(429), Some(7))
        );
        assert!(
            delivery["body"]["error"]
                .as_str()
                .unwrap()
                .contains("apify: HTTP 429"),
            "{delivery}"
        );
        assert_eq!(delivery["body"]["parts"][0]["status"], 200);

        // The retry: the filled slot is not called again, the other is.
        let retry = calls("enrichment_calls", &[ceo, cfo]);
        assert_eq!(retry[0]["action"], "done");
        assert_eq!(retry[1]["action"], "call");
        finish("enrichment", cfo, "200", "'[]'", "NULL", "NULL");
        assert_eq!(answer("enrichment", &[ceo, cfo])["status"], 200);
        assert_eq!(
            count(&format!(
                "SELECT calls FROM pipeline.service_calls WHERE slot_id = {ceo}"
            )),
            1
        );
        assert_eq!(
            count(&format!(
                "SELECT calls FROM pipeline.service_calls WHERE slot_id = {cfo}"
            )),
            2
        );
        // A receiver that finishes late (its delivery gave up): no harm.
        let late = finish(
            "enrichment",
            ceo,
            "200",
            "'[{\"full_name\": \"Someone Else\"}]'",
            "NULL",
            "NULL",
        );
        assert_eq!(late["outcome"], "enriched");
        assert_eq!(
            text(&format!(
                "SELECT full_name FROM marketing.company_slots WHERE id = {ceo}"
            )),
            "Ada Lovelace"
        );
        assert_eq!(events_of("contact_enriched").len(), 1);
    }

    #[pg_test]
    fn a_service_failure_keeps_its_meaning() {
        let (ceo, _) = two_slots("Meaning", "meaning.example");
        // (status, body, Retry-After, error) -> (answer, Retry-After, words)
        for (status, body, wait, error, expected, expected_wait, words) in [
            (
                "429",
                "NULL",
                "'10'",
                "NULL",
                429,
                Some(10),
                "apify: HTTP 429",
            ),
            (
                "429",
                "NULL",
                "NULL",
                "NULL",
                429,
                Some(30),
                "apify: HTTP 429",
            ),
            (
                "408",
                "'{\"error\": {\"type\": \"run-timeout-exceeded\"}}'",
                "NULL",
                "NULL",
                504,
                None,
                "run-timeout-exceeded",
            ),
            (
                "NULL",
                "NULL",
                "NULL",
                "'timeout: global'",
                504,
                None,
                "apify: no answer: timeout: global",
            ),
            (
                "NULL",
                "NULL",
                "NULL",
                "'Connection refused'",
                503,
                None,
                "no answer: Connection refused",
            ),
            ("500", "'oops'", "NULL", "NULL", 503, None, "HTTP 500: oops"),
            ("401", "'{}'", "NULL", "NULL", 424, None, "HTTP 401"),
            ("402", "'{}'", "NULL", "NULL", 424, None, "HTTP 402"),
            ("403", "'{}'", "NULL", "NULL", 424, None, "HTTP 403"),
            ("404", "'{}'", "NULL", "NULL", 424, None, "HTTP 404"),
            ("400", "'{}'", "NULL", "NULL", 424, None, "HTTP 400"),
            ("302", "''", "NULL", "NULL", 502, None, "HTTP 302"),
            ("200", "'<html>'", "NULL", "NULL", 502, None, "not JSON"),
            (
                "200",
                "'{\"items\": []}'",
                "NULL",
                "NULL",
                502,
                None,
                "not the array of dataset items",
            ),
            // Keys a client repeats in its words are masked.
            (
                "NULL",
                "NULL",
                "NULL",
                "'error sending https://x.example/v2?token=s3cret&x=1 Bearer abc.def'",
                503,
                None,
                "token=***&x=1 Bearer ***",
            ),
        ] {
            calls("enrichment_calls", &[ceo]);
            let got = finish("enrichment", ceo, status, body, wait, error);
            assert_eq!(
                got["status"].as_i64(),
                Some(expected),
                "{status} {error}: {got}"
            );
            assert_eq!(
                got["retry_after"].as_i64(),
                expected_wait,
                "{status}: {got}"
            );
            assert!(
                got["outcome"].as_str().unwrap().contains(words),
                "{status}: {got}"
            );
            let delivery = answer("enrichment", &[ceo]);
            assert_eq!(delivery["status"].as_i64(), Some(expected), "{delivery}");
        }
        assert!(
            !text("SELECT string_agg(last_error, ' ') FROM pipeline.service_calls")
                .contains("s3cret")
        );

        // MillionVerifier: its failures come as HTTP 200 too.
        run(&format!(
            "SELECT pipeline.record_enrichment({ceo}, '[{{\"full_name\": \"Vera\", \"email\": \"vera@meaning.example\"}}]')"
        ));
        for (answer_body, expected, words) in [
            (
                r#"{"email": "vera@meaning.example", "result": "error", "resultcode": 4, "error": "Apikey not found"}"#,
                424,
                "Apikey not found",
            ),
            (
                r#"{"email": "vera@meaning.example", "result": "error", "resultcode": 4, "error": "Insufficient credits"}"#,
                424,
                "Insufficient credits",
            ),
            (
                r#"{"email": "vera@meaning.example", "result": "error", "error": "Something odd"}"#,
                502,
                "Something odd",
            ),
            (
                r#"{"email": "other@meaning.example", "result": "ok", "quality": "good"}"#,
                422,
                "the answer is about other@meaning.example",
            ),
        ] {
            let listed = calls("verification_calls", &[ceo]);
            assert_eq!(listed[0]["action"], "call", "{listed:?}");
            assert_eq!(
                listed[0]["query"],
                json!({"email": "vera@meaning.example", "timeout": "20"})
            );
            let got = finish(
                "verification",
                ceo,
                "200",
                &format!("'{answer_body}'"),
                "NULL",
                "NULL",
            );
            assert_eq!(got["status"].as_i64(), Some(expected), "{got}");
            assert!(got["outcome"].as_str().unwrap().contains(words), "{got}");
        }
        assert_eq!(
            count("SELECT count(*) FROM marketing.email_verification"),
            0
        );
        // The same verdict twice, differing in credits and time: one row,
        // and the address is not sent to the verifier again.
        for credits in [900, 899] {
            calls("verification_calls", &[ceo]);
            let got = finish(
                "verification",
                ceo,
                "200",
                &format!("'{{\"email\": \"vera@meaning.example\", \"result\": \"ok\", \"quality\": \"good\", \"credits\": {credits}, \"executiontime\": {}}}'", credits % 3),
                "NULL",
                "NULL",
            );
            assert_eq!(got["status"], 200);
        }
        assert_eq!(
            count("SELECT count(*) FROM marketing.email_verification"),
            1
        );
        assert_eq!(calls("verification_calls", &[ceo])[0]["action"], "done");
        assert_eq!(answer("verification", &[ceo])["status"], 200);
    }

    #[pg_test]
    fn the_most_urgent_failure_answers_for_the_delivery() {
        let (a, b) = two_slots("Urgent", "urgent.example");
        let (c, d) = two_slots("Urgent Two", "urgent-two.example");
        calls("enrichment_calls", &[a, b, c, d]);
        finish("enrichment", a, "402", "'{}'", "NULL", "NULL");
        finish("enrichment", b, "500", "'{}'", "NULL", "NULL");
        finish("enrichment", c, "429", "'{}'", "'3'", "NULL");
        finish("enrichment", d, "429", "'{}'", "'9'", "NULL");
        // A rate limit first (its longest wait), so the others are retried too.
        let all = answer("enrichment", &[a, b, c, d]);
        assert_eq!(
            (all["status"].as_i64(), all["retry_after"].as_i64()),
            (Some(429), Some(9))
        );
        assert_eq!(all["body"]["parts"].as_array().unwrap().len(), 4);
        assert_eq!(answer("enrichment", &[a, b])["status"], 503);
        // Only a refusal a person must fix: 424, which is not retried.
        assert_eq!(answer("enrichment", &[a])["status"], 424);
        assert_eq!(answer("enrichment", &[a, -1])["status"], 424);
        assert_eq!(answer("enrichment", &[-1])["status"], 422);
        assert_eq!(answer("enrichment", &[])["status"], 200);
    }

    #[pg_test]
    fn bad_service_settings_are_refused_naming_the_field() {
        for (change, field) in [
            ("base_url => 'ftp://x.example'", "base_url_is_http_url"),
            (
                "base_url => 'https://x.example/path?token=1'",
                "base_url_is_http_url",
            ),
            ("actor => 'no-tilde'", "actor_is_username_tilde_name"),
            (
                "input => '{\"company\": \"x\"}'",
                "input_is_object_with_domain",
            ),
            (
                "role_titles => '{\"ceo\": \"CEO\"}'",
                "role_titles_is_object_of_arrays",
            ),
            (
                "fields => '{\"full_name\": [\"name\"]}'",
                "fields_names_slot_columns",
            ),
            (
                "fields => '{\"full_name\": [], \"email\": [], \"enrichment_status\": [\"x\"]}'",
                "fields_names_slot_columns",
            ),
            ("max_items => 0", "max_items_between_1_and_100"),
            ("call_timeout_s => 1", "call_timeout_s_range"),
        ] {
            assert_error(
                &format!("SELECT pipeline.set_service('apify', {change})"),
                field,
            );
        }
        assert_error(
            "SELECT pipeline.set_service('millionverifier', call_timeout_s => 61)",
            "call_timeout_s_range",
        );
        assert_error(
            "SELECT pipeline.set_service('millionverifier', actor => 'a~b')",
            "actor_is_username_tilde_name",
        );
        assert_error(
            "SELECT pipeline.set_service('hunter', base_url => 'https://x.example')",
            "service_known",
        );
        // What is changed wins, the rest stays the default; reset goes back.
        let now = json("SELECT to_jsonb(s) FROM pipeline.set_service('apify', actor => 'someone~people', max_items => 3) s");
        assert_eq!(
            (
                &now["actor"],
                &now["max_items"],
                &now["base_url"],
                &now["call_timeout_s"]
            ),
            (
                &json!("someone~people"),
                &json!(3),
                &json!("https://api.apify.com"),
                &json!(240)
            )
        );
        let kept =
            json("SELECT to_jsonb(s) FROM pipeline.set_service('apify', call_timeout_s => 100) s");
        assert_eq!(
            (&kept["actor"], &kept["call_timeout_s"]),
            (&json!("someone~people"), &json!(100))
        );
        let reset = json("SELECT to_jsonb(s) FROM pipeline.set_service('apify', reset => true) s");
        assert_eq!(reset["actor"], "code_crafter~leads-finder");
        assert!(reset["changed_at"].is_string(), "{reset}");
        assert_eq!(
            count("SELECT count(*) FROM pipeline.services_in_effect WHERE changed_at IS NULL"),
            1
        );
    }

    #[pg_test]
    fn a_long_request_keeps_its_events_claimed_until_it_must_have_ended() {
        run("SELECT pipeline.register_webhook('slots_created', 'https://receiver.example/enrich', timeout_ms => 660000)");
        run("SELECT pipeline.register_webhook('company_created', 'https://receiver.example/validate')");
        run("INSERT INTO intake.company_raw_intake (company, website) VALUES ('Long', 'https://long.example')");
        run("SELECT pipeline.emit('slots_created', '{\"key\": {\"company_id\": 0}, \"new\": []}')");
        assert_eq!(
            count("SELECT count(*) FROM pipeline._claim_deliveries(10, interval '30 seconds', 'test')"),
            2
        );
        let held = json(
            "SELECT jsonb_object_agg(event_type, round(extract(epoch FROM next_attempt_at - now())))
             FROM marketing.pipeline_events e WHERE e.status = 'processing'",
        );
        // The timeout and a lease more; a short request, the lease only.
        assert_eq!(held, json!({"slots_created": 690, "company_created": 30}));
    }
}

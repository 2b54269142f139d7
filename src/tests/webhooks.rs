//! The webhook registry: register, change, disable, remove, import, export.

#[pgrx::pg_schema]
mod tests {
    use crate::tests::*;
    use serde_json::json;

    const REGISTRY: &str = r#"{"base_url": "https://example.app.n8n.cloud", "webhooks": {
        "company_created": "/webhook/validate-company",
        "company_validated": "/webhook/promote-company",
        "company_promoted": "/webhook/create-slots",
        "slots_created": "/webhook/enrich-contact",
        "contact_enriched": "/webhook/verify-email"}}"#;

    fn webhook(event_type: &str) -> serde_json::Value {
        json(&format!(
            "SELECT to_jsonb(w) - 'created_at' - 'updated_at' || jsonb_build_object('headers', c.headers, 'secret', c.secret)
             FROM pipeline.webhooks w LEFT JOIN pipeline.webhook_credentials c USING (event_type)
             WHERE event_type = '{event_type}'"
        ))
    }

    #[pg_test]
    fn a_registry_names_the_header_its_receivers_confirm_with() {
        let actions = json(
            r#"SELECT jsonb_agg(action) FROM pipeline.import_registry('{"base_url": "https://n.example",
                   "confirm_header": "X-Pipeline-Done",
                   "webhooks": {"company_created": "/a", "company_validated": {"url": "/b", "confirm_header": "X-Other"}}}')"#,
        );
        assert_eq!(actions, json!(["created", "created"]));
        assert_eq!(
            webhook("company_created")["confirm_header"],
            "X-Pipeline-Done"
        );
        assert_eq!(webhook("company_validated")["confirm_header"], "X-Other");
        // The export gives it back, per endpoint; importing that changes nothing.
        let exported = json("SELECT pipeline.export_registry()");
        assert_eq!(
            exported["webhooks"]["company_created"]["confirm_header"],
            "X-Pipeline-Done"
        );
        assert_eq!(
            json(&format!(
                "SELECT jsonb_agg(DISTINCT action) FROM pipeline.import_registry('{exported}')"
            )),
            json!(["unchanged"])
        );
        assert_error(
            r#"SELECT * FROM pipeline.import_registry('{"base_url": "https://n.example", "confirm_header": 7, "webhooks": {}}')"#,
            "confirm_header",
        );
        assert_error(
            r#"SELECT * FROM pipeline.import_registry('{"base_url": "https://n.example", "webhooks": {"company_created": {"url": "/a", "confirm_header": "a b"}}}')"#,
            "registry: webhooks.company_created: confirm_header must be a header name",
        );
        run("SELECT pipeline.update_webhook('company_created', confirm_header => '')");
        assert!(webhook("company_created")["confirm_header"].is_null());
    }

    #[pg_test]
    fn webhooks_register_change_disable_remove() {
        run("SELECT pipeline.register_webhook('company_created', 'https://n8n.example/webhook/validate-company',
                 headers => '{\"Authorization\": \"Basic dTpw\"}', secret => 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw',
                 timeout_ms => 2000, max_in_flight => 4)");
        let row = webhook("company_created");
        assert_eq!(row["method"], "POST");
        assert_eq!(row["headers"], json!({ "Authorization": "Basic dTpw" }));
        assert_eq!(row["max_in_flight"], 4);
        assert_eq!(row["enabled"], true);

        run("SELECT pipeline.update_webhook('company_created', method => 'put', timeout_ms => 0, secret => '')");
        let row = webhook("company_created");
        assert_eq!(row["method"], "PUT");
        assert!(row["timeout_ms"].is_null(), "0 restores the global setting");
        assert!(row["secret"].is_null(), "'' removes the secret");
        assert_eq!(row["max_in_flight"], 4, "untouched fields stay");

        run("SELECT pipeline.disable_webhook('company_created', 'n8n maintenance')");
        assert_eq!(
            webhook("company_created")["disabled_reason"],
            "n8n maintenance"
        );
        run("SELECT pipeline.enable_webhook('company_created')");
        assert_eq!(webhook("company_created")["enabled"], true);
        assert!(webhook("company_created")["disabled_reason"].is_null());

        run("SELECT pipeline.register_webhook('company_created', 'http://127.0.0.1:5678/webhook/x')");
        assert_eq!(
            webhook("company_created")["max_in_flight"],
            serde_json::Value::Null,
            "register replaces"
        );
        assert_eq!(
            value::<bool>("SELECT pipeline.remove_webhook('company_created')"),
            Some(true)
        );
        assert_eq!(
            value::<bool>("SELECT pipeline.remove_webhook('company_created')"),
            Some(false)
        );
    }

    #[pg_test]
    fn refusals_never_repeat_a_credential() {
        for sql in [
            "SELECT pipeline.register_webhook('company_created', 'https://user:hunter22@n8n example/x')",
            "SELECT pipeline.register_webhook('company_created', 'https://user:hunter22@n8n.example/x')",
            "SELECT pipeline.register_webhook('company_created', 'https://hunter22@n8n.exämple/x')",
            r#"SELECT pipeline.import_registry('{"base_url": "https://u:hunter22@n8n.example/", "webhooks": {}}')"#,
            r#"SELECT pipeline.import_registry('{"headers": {"X-Key": {"token": "hunter22"}}, "webhooks": {}}')"#,
            r#"SELECT pipeline.import_registry('{"headers": {"X-Key": 4711223344}, "webhooks": {}}')"#,
            r#"SELECT pipeline.import_registry('{"webhooks": {"company_created": "ftp://u:hunter22@n8n.example/x"}}')"#,
            r#"SELECT pipeline.import_registry('{"webhooks": {"company_created": "/x"}, "base_url": "https://u:hunter22@n8n.example/?q"}')"#,
        ] {
            let message = error_of(sql).unwrap_or_else(|| panic!("{sql} succeeded"));
            assert!(
                !message.contains("hunter22") && !message.contains("4711223344"),
                "{sql}\n  repeats the credential: {message}"
            );
        }
        assert_error(
            "SELECT pipeline.register_webhook('company_created', 'https://user:hunter22@n8n.example/x')",
            r#"url "https://***@n8n.example/x" must not carry user:password@"#,
        );
    }

    #[pg_test]
    fn webhooks_refuse_bad_endpoints() {
        let register = |args: &str| format!("SELECT pipeline.register_webhook({args})");
        let cases = [
            ("'company_created', 'ftp://n8n.example/x'", "is not an http:// or https:// URL"),
            ("'company_created', 'n8n.example/webhook'", "is not an http:// or https:// URL"),
            ("'company_created', 'https://n8n example/x'", "must not contain spaces or control characters"),
            ("'company_created', E'https://n8n\\x01.example/x'", "must not contain spaces or control characters"),
            ("'company_created', E'https://n8n.example/x\\x7f'", "must not contain spaces or control characters"),
            ("'company_created', E'https://n8n.example/\\tx'", "must not contain spaces or control characters"),
            ("'company_created', 'https://n8n.exämple/x'", "must be ASCII"),
            ("'company_created', 'https://n8n.example/<x>'", "is not a valid URL"),
            ("'company_created', 'https://-n8n.example/x'", "is not a valid URL"),
            ("'company_created', 'https://user:pw@n8n.example/x'", "must not carry user:password@"),
            ("'company_created', 'https://n8n.example:70000/x'", "port outside 1-65535"),
            ("'company_created', 'https://n8n.example:0/x'", "port outside 1-65535"),
            ("'company_created', NULL", "url must not be NULL"),
            ("'company_created', 'https://n8n.example', method => 'GET'", "method must be POST, PUT or PATCH"),
            ("'company_created', 'https://n8n.example', headers => '[1]'", "headers must be a JSON object"),
            ("'company_created', 'https://n8n.example', headers => '{\"X-Key\": 5}'", "must have a string value"),
            ("'company_created', 'https://n8n.example', headers => '{\"Bad Name\": \"v\"}'", "not a valid HTTP header name"),
            (
                "'company_created', 'https://n8n.example', headers => '{\"X-Key\": \"a\\r\\nX-Evil: 1\"}'",
                "must not contain line breaks",
            ),
            ("'company_created', 'https://n8n.example', headers => '{\"X-Key\": \"a\\u0001b\"}'", "must not contain control characters"),
            ("'company_created', 'https://n8n.example', headers => '{\"X-Key\": \"a\\u007fb\"}'", "must not contain control characters"),
            (
                "'company_created', 'https://n8n.example', headers => jsonb_build_object('X-Big', repeat('a', 100000))",
                "is longer than 8192 bytes",
            ),
            (
                "'company_created', 'https://n8n.example', headers => (SELECT jsonb_object_agg('X-' || i, repeat('a', 8000)) FROM generate_series(1, 3) i)",
                "longer than 16384 bytes in all",
            ),
            (
                "'company_created', 'https://n8n.example', headers => (SELECT jsonb_object_agg('X-' || i, 'v') FROM generate_series(1, 65) i)",
                "at most 64 headers",
            ),
            (
                "'company_created', 'https://n8n.example', headers => jsonb_build_object(repeat('x', 300), 'v')",
                "longer than 256 characters",
            ),
            ("'company_created', 'https://n8n.example', secret => 'whsec_MfKQ9r8GKYqrTwjU PD8ILPZIo2LaLaSw'", "no spaces"),
            ("'company_created', 'https://n8n.example', secret => E'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\\n'", "control characters"),
            ("'company_created', 'https://n8n.example', secret => 'whsec_QR=='", "not canonical base64"),
            ("'company_created', 'https://n8n.example', secret => repeat('s', 1025)", "longer than 1024"),
            ("'company_created', 'https://n8n.example', headers => '{\"Content-Type\": \"text/plain\"}'", "set by the worker"),
            ("'company_created', 'https://n8n.example', headers => '{\"webhook-signature\": \"v1,x\"}'", "set by the worker"),
            ("'company_created', 'https://n8n.example', secret => 'whsec_!!'", "must continue with base64"),
            ("'company_created', 'https://n8n.example', secret => ' '", "secret is blank"),
            ("'company_created', 'https://n8n.example', timeout_ms => 0", "timeout_ms must be between 1 and 900000 (15 minutes)"),
            ("'company_created', 'https://n8n.example', confirm_header => 'X Done'", "confirm_header must be a header name"),
            ("'company_created', 'https://n8n.example', confirm_header => ''", "confirm_header must be a header name"),
            ("'company_created', 'https://n8n.example', max_in_flight => -1", "max_in_flight must be between 1 and 1000"),
            ("'no_such_event', 'https://n8n.example'", "unknown event type 'no_such_event'"),
            ("'Bad Type', 'https://n8n.example'", "invalid event type 'Bad Type'"),
        ];
        for (args, expected) in cases {
            assert_error(&register(args), expected);
        }
        assert_eq!(
            count("SELECT count(*) FROM pipeline.webhooks"),
            0,
            "nothing half-registered"
        );
        assert_error(
            "SELECT pipeline.update_webhook('company_created', url => 'https://x.example')",
            "no webhook is registered for event type 'company_created'",
        );
        assert_error(
            "SELECT pipeline.disable_webhook('company_created')",
            "no webhook is registered",
        );
        run("SELECT pipeline.register_webhook('manual_ping', 'https://n8n.example', allow_unknown_type => true)");
        assert_error(
            "SELECT pipeline.update_webhook('manual_ping', url => 'mailto:x@y.z')",
            "is not an http:// or https:// URL",
        );
    }

    #[pg_test]
    fn webhooks_import_export_round_trip() {
        let imported = json(&format!(
            "SELECT jsonb_agg(jsonb_build_array(event_type, url, action) ORDER BY event_type)
             FROM pipeline.import_registry('{REGISTRY}')"
        ));
        assert_eq!(
            imported[0],
            json!([
                "company_created",
                "https://example.app.n8n.cloud/webhook/validate-company",
                "created"
            ])
        );
        assert_eq!(imported.as_array().unwrap().len(), 5);
        assert_eq!(count("SELECT count(*) FROM pipeline.webhooks"), 5);

        let again = json(&format!(
            "SELECT jsonb_agg(DISTINCT action) FROM pipeline.import_registry('{REGISTRY}')"
        ));
        assert_eq!(
            again,
            json!(["unchanged"]),
            "importing the same file twice changes nothing"
        );

        let exported = json("SELECT pipeline.export_registry()");
        let original: serde_json::Value = serde_json::from_str(REGISTRY).unwrap();
        assert_eq!(exported, original, "export gives the file back");

        // Objects, full URLs and a disabled endpoint survive the round trip too.
        run(
            r#"SELECT pipeline.import_registry('{"base_url": "https://example.app.n8n.cloud/", "webhooks": {
                 "company_created": {"url": "/webhook/validate-company", "headers": {"Authorization": "Basic dTpw"},
                                     "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "timeout_ms": 2500,
                                     "max_in_flight": 4, "method": "PUT"},
                 "company_promoted": {"url": "http://127.0.0.1:9000/done", "enabled": false}}}')"#,
        );
        assert_eq!(
            webhook("company_created")["url"],
            "https://example.app.n8n.cloud/webhook/validate-company"
        );
        assert_eq!(webhook("company_created")["timeout_ms"], 2500);
        assert_eq!(webhook("company_promoted")["enabled"], false);
        let exported = text("SELECT pipeline.export_registry()::text");
        let actions = json(&format!(
            "SELECT jsonb_agg(DISTINCT action) FROM pipeline.import_registry('{exported}')"
        ));
        assert_eq!(
            actions,
            json!(["unchanged"]),
            "import(export()) changes nothing: {exported}"
        );

        // The enabled flag of an existing endpoint is kept unless the file sets it.
        run("SELECT pipeline.disable_webhook('company_promoted', '410 Gone')");
        run(&format!("SELECT pipeline.import_registry('{REGISTRY}')"));
        assert_eq!(webhook("company_promoted")["enabled"], false);
    }

    #[pg_test]
    fn webhooks_registry_headers_go_to_every_endpoint() {
        // The header of an n8n Header Auth, once for the whole file; an
        // endpoint's own header of the same name wins.
        run(
            r#"SELECT pipeline.import_registry('{"base_url": "https://n8n.example",
                 "headers": {"X-Pipeline-Auth": "s3cret", "X-Team": "outreach"},
                 "webhooks": {"company_created": "/webhook/validate-company",
                              "company_validated": {"url": "/webhook/promote-company",
                                                    "headers": {"X-Team": "promotion"}}}}')"#,
        );
        assert_eq!(
            webhook("company_created")["headers"],
            json!({ "X-Pipeline-Auth": "s3cret", "X-Team": "outreach" })
        );
        assert_eq!(
            webhook("company_validated")["headers"],
            json!({ "X-Pipeline-Auth": "s3cret", "X-Team": "promotion" })
        );
        // A reference the loader did not resolve, and other bad shapes: refused,
        // naming the key, and nothing changes.
        for (registry, expected) in [
            (
                r#"{"headers": {"X-Pipeline-Auth": {"env": "PIPELINE_N8N_WEBHOOK_TOKEN"}}, "webhooks": {}}"#,
                r#"registry: headers.X-Pipeline-Auth: the value must be a string, not object; a reference such as {"$env": ...} must be replaced by its value before the import"#,
            ),
            (
                r#"{"headers": ["X-Pipeline-Auth"], "webhooks": {}}"#,
                "registry: headers must be a object, not array",
            ),
            (
                r#"{"headers": {"Content-Type": "text/plain"}, "webhooks": {"company_created": "https://n8n.example/x"}}"#,
                r#"header "Content-Type" is set by the worker and cannot be overridden"#,
            ),
        ] {
            assert_error(
                &format!("SELECT pipeline.import_registry('{registry}')"),
                expected,
            );
        }
        assert_eq!(
            webhook("company_created")["headers"],
            json!({ "X-Pipeline-Auth": "s3cret", "X-Team": "outreach" })
        );
    }

    #[pg_test]
    fn webhooks_round_trip_emitted_types_and_literal_origins() {
        // A type only pipeline.emit sends, and an origin with _ in it that a
        // LIKE pattern would take as a wildcard.
        run("SELECT pipeline.register_webhook('audit_note', 'http://a_b.example/z', allow_unknown_type => true)");
        run("SELECT pipeline.register_webhook('company_created', 'http://a_b.example/y')");
        run("SELECT pipeline.register_webhook('company_promoted', 'http://aXb.example/z')");
        let exported = text("SELECT pipeline.export_registry()::text");
        let document: serde_json::Value = serde_json::from_str(&exported).unwrap();
        assert_eq!(
            document["webhooks"]["audit_note"]["allow_unknown_type"],
            true
        );
        assert_eq!(
            document["webhooks"]["company_promoted"],
            "http://aXb.example/z"
        );
        run("DELETE FROM pipeline.webhooks");
        let actions = json(&format!(
            "SELECT jsonb_object_agg(event_type, action) FROM pipeline.import_registry('{exported}')"
        ));
        assert_eq!(
            actions,
            json!({"audit_note": "created", "company_created": "created", "company_promoted": "created"})
        );
        assert_eq!(webhook("company_promoted")["url"], "http://aXb.example/z");
        assert_eq!(webhook("audit_note")["url"], "http://a_b.example/z");
        assert_eq!(text("SELECT pipeline.export_registry()::text"), exported);
    }

    #[pg_test]
    fn claims_keep_to_a_byte_budget_and_refuse_large_events() {
        run("SELECT pipeline.register_webhook('company_created', 'https://n8n.example/x')");
        // Random hex does not compress: about 4 kB stored each.
        for _ in 0..4 {
            run(
                "SELECT pipeline.emit('company_created', jsonb_build_object('blob',
                     (SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 128))))",
            );
        }
        // 6000 bytes: the first event, then no second (the first always comes).
        let kept = json(
            "SELECT jsonb_agg(jsonb_build_array(event_id, body IS NOT NULL, body_bytes > 4000) ORDER BY event_id)
             FROM pipeline._claim_deliveries(10, NULL, 'test', NULL, NULL, 6000, NULL)",
        );
        assert_eq!(kept.as_array().unwrap().len(), 1, "{kept}");
        assert_eq!(kept[0][1], true);
        assert_eq!(
            json("SELECT jsonb_agg(status || ':' || attempts ORDER BY id) FROM marketing.pipeline_events"),
            serde_json::json!(["processing:1", "pending:0", "pending:0", "pending:0"]),
            "the rest went back unclaimed"
        );
        // Larger than max_event_bytes: claimed, but no body to send.
        let refused = json(
            "SELECT jsonb_agg(jsonb_build_array(body IS NULL, body_bytes) ORDER BY event_id)
             FROM pipeline._claim_deliveries(10, NULL, 'test', NULL, NULL, NULL, 1000)",
        );
        assert_eq!(refused.as_array().unwrap().len(), 3, "{refused}");
        for row in refused.as_array().unwrap() {
            assert_eq!(row[0], true);
            assert!(row[1].as_i64().unwrap() > 1000, "{row}");
        }
        // Skipped types and probes (only one type).
        run("UPDATE marketing.pipeline_events SET status = 'pending', next_attempt_at = now()");
        assert_eq!(
            count("SELECT count(*) FROM pipeline._claim_deliveries(10, NULL, 'test', ARRAY['company_created'])"),
            0
        );
        assert_eq!(
            count("SELECT count(*) FROM pipeline._claim_deliveries(1, NULL, 'test', NULL, ARRAY['company_created'])"),
            1
        );
    }

    #[pg_test]
    fn a_compressible_payload_counts_at_its_full_size() {
        run("SELECT pipeline.register_webhook('company_created', 'https://n8n.example/x')");
        let id = count("SELECT pipeline.emit('company_created', jsonb_build_object('pad', repeat('a', 10000000)))");
        let (stored, full) = (
            count(&format!("SELECT pg_column_size(payload) FROM marketing.pipeline_events WHERE id = {id}")),
            count(&format!(
                "SELECT pipeline._payload_bytes(payload) FROM marketing.pipeline_events WHERE id = {id}"
            )),
        );
        assert!(stored < 1_000_000, "stored compressed: {stored}");
        assert!(full > 10_000_000, "counted in full: {full}");
        let refused = json(
            "SELECT jsonb_agg(jsonb_build_array(body IS NULL, body_bytes))
             FROM pipeline._claim_deliveries(10, NULL, 'test', NULL, NULL, NULL, 1048576)",
        );
        assert_eq!(refused[0][0], true, "{refused}");
        assert!(refused[0][1].as_i64().unwrap() > 10_000_000, "{refused}");
    }

    #[pg_test]
    fn webhooks_import_names_the_wrong_key() {
        let before = count("SELECT count(*) FROM pipeline.webhooks");
        let cases = [
            ("[]", "registry must be a JSON object"),
            (r#"{"base_url": "https://x.example", "webhooks": {}, "version": 2}"#, r#"registry: unknown key "version""#),
            (r#"{"base_url": "https://x.example"}"#, "registry: webhooks must be an object"),
            (r#"{"base_url": 5, "webhooks": {}}"#, "registry: base_url must be an http(s) URL"),
            (r#"{"base_url": "ftp://x.example", "webhooks": {}}"#, "registry: base_url must be an http(s) URL"),
            (r#"{"webhooks": {"company_created": "/webhook/a"}}"#, "registry: webhooks.company_created: \"/webhook/a\" is a path, but the registry has no base_url"),
            (r#"{"base_url": "https://x.example", "webhooks": {"company_created": 42}}"#, "registry: webhooks.company_created: must be a path"),
            (r#"{"base_url": "https://x.example", "webhooks": {"company_created": "webhook/a"}}"#, "must be a path starting with / or a full http(s) URL"),
            (r#"{"base_url": "https://x.example", "webhooks": {"company_created": {"url": "/a", "timeout": 5}}}"#, r#"registry: webhooks.company_created: unknown key "timeout""#),
            (r#"{"base_url": "https://x.example", "webhooks": {"company_created": {"headers": {}}}}"#, "registry: webhooks.company_created: url is missing"),
            (r#"{"base_url": "https://x.example", "webhooks": {"company_created": {"url": "/a", "timeout_ms": "5"}}}"#, "registry: webhooks.company_created: timeout_ms must be a number, not string"),
            (r#"{"base_url": "https://x.example", "webhooks": {"company_created": {"url": "/a", "timeout_ms": 2.5}}}"#, "timeout_ms must be a whole number"),
            (r#"{"base_url": "https://x.example", "webhooks": {"company_created": {"url": "/a", "enabled": "yes"}}}"#, "enabled must be a boolean, not string"),
            (r#"{"base_url": "https://x.example", "webhooks": {"company_created": {"url": "/a", "headers": {"X": 1}}}}"#, "registry: webhooks.company_created: header \"X\" must have a string value"),
            (r#"{"base_url": "https://x.example", "webhooks": {"no_such_event": "/a"}}"#, "registry: webhooks.no_such_event: unknown event type 'no_such_event'"),
            // All or nothing: the good first entry is not kept either.
            (r#"{"base_url": "https://x.example", "webhooks": {"company_created": "/ok", "company_validated": "nope"}}"#, "webhooks.company_validated"),
        ];
        for (registry, expected) in cases {
            assert_error(
                &format!("SELECT pipeline.import_registry('{registry}')"),
                expected,
            );
        }
        assert_error(
            "SELECT pipeline.import_registry(NULL)",
            "registry must be a JSON object",
        );
        assert_eq!(
            count("SELECT count(*) FROM pipeline.webhooks"),
            before,
            "bad input changes nothing"
        );
    }

    #[pg_test]
    fn webhooks_decide_what_is_claimed() {
        run("SELECT pipeline.emit('company_created', '{}') FROM generate_series(1, 3)");
        run("SELECT pipeline.emit('company_validated', '{}')");
        assert_eq!(
            count("SELECT count(*) FROM pipeline._claim_deliveries(10)"),
            0,
            "no endpoint: events wait"
        );
        run("SELECT pipeline.register_webhook('company_created', 'https://n8n.example/validate')");
        let claimed = json(
            "SELECT jsonb_agg(to_jsonb(c) ORDER BY event_id) FROM pipeline._claim_deliveries(10) c",
        );
        assert_eq!(claimed.as_array().unwrap().len(), 3);
        let body: serde_json::Value =
            serde_json::from_str(claimed[0]["body"].as_str().unwrap()).unwrap();
        assert_eq!(body["type"], "company_created");
        assert_eq!(body["attempt"], 1);
        assert_eq!(body["source"]["op"], "EMIT");
        assert_eq!(body["data"], json!({}));
        assert_eq!(claimed[0]["url"], "https://n8n.example/validate");

        run("SELECT pipeline.register_webhook('company_validated', 'https://n8n.example/promote', enabled => false)");
        assert_eq!(
            count("SELECT count(*) FROM pipeline._claim_deliveries(10)"),
            0,
            "disabled: events wait"
        );
        assert_eq!(
            text("SELECT status FROM marketing.pipeline_events WHERE event_type = 'company_validated'"),
            "pending",
            "waiting is not failing"
        );
    }

    /// A body is written out as text; it must be the very bytes that
    /// jsonb_build_object(...)::text gives (and that receivers signed and
    /// parsed before), for any payload, source and time zone.
    #[pg_test]
    fn bodies_are_the_bytes_of_their_jsonb_form() {
        run("SET LOCAL timezone = 'America/St_Johns'");
        run("SELECT pipeline.register_webhook('company_created', 'https://n8n.example/validate')");
        run(
            r#"INSERT INTO marketing.pipeline_events (event_type, payload, source_table, source_op, source_key) VALUES
               ('company_created', '{"a": 1, "b": [1, 2, {"c": null}], "é": "x\"y\n\u0001", "": true}',
                'intake.company_raw_intake', 'INSERT', '{"id": 5}'),
               ('company_created', '{}', NULL, NULL, NULL),
               ('company_created', '[1, "two", 3.50, 1e10, -0]', 'we"ird\table', 'UPDATE', '{"k": "v\\x", "id": 2}'),
               ('company_created', '"just a string"', 'x', 'DELETE', '[]'),
               ('company_created', '12345678901234567890.123', NULL, 'EMIT', '{"z": {"y": 1}}')"#,
        );
        let claimed = json(
            "SELECT jsonb_agg(jsonb_build_object('id', c.event_id, 'body', c.body) ORDER BY c.event_id)
             FROM pipeline._claim_deliveries(10) c",
        );
        let claimed = claimed.as_array().unwrap();
        assert_eq!(claimed.len(), 5);
        for row in claimed {
            let id = row["id"].as_i64().unwrap();
            let expected = text(&format!(
                "SELECT jsonb_build_object('id', e.id, 'type', e.event_type, 'created_at', e.created_at,
                                           'attempt', e.attempts,
                                           'source', jsonb_build_object('table', e.source_table,
                                                                        'op', e.source_op, 'key', e.source_key),
                                           'data', e.payload)::text
                 FROM marketing.pipeline_events e WHERE e.id = {id}"
            ));
            assert_eq!(row["body"].as_str().unwrap(), expected, "event {id}");
        }
    }

    #[pg_test]
    fn webhooks_record_outcomes() {
        run("SET LOCAL pipeline.max_attempts = 2");
        run("SELECT pipeline.register_webhook('company_created', 'https://n8n.example/validate')");
        run("SELECT pipeline.emit('company_created', '{}') FROM generate_series(1, 4)");
        let ids: Vec<i64> = json(
            "SELECT jsonb_agg(event_id ORDER BY event_id) FROM pipeline._claim_deliveries(10)",
        )
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
        let [ok, busy, bad, gone] = ids[..] else {
            panic!("{ids:?}")
        };
        let settled = json(&format!(
            "SELECT jsonb_object_agg(event_id, status) FROM pipeline._record_deliveries(
                 ARRAY[{ok}, {busy}, {bad}, {gone}]::bigint[], ARRAY[1, 1, 1, 1],
                 ARRAY['delivered', 'retry', 'failed', 'gone'], ARRAY[200, 429, 400, 410],
                 ARRAY[NULL, 'HTTP 429', 'HTTP 400', 'HTTP 410'], ARRAY[NULL, 60000, NULL, NULL]::integer[],
                 ARRAY[12, 3, 4, 5], ARRAY['ok', NULL, 'bad field', NULL],
                 ARRAY['https://n8n.example/validate', 'https://n8n.example/validate',
                       'https://n8n.example/validate', 'https://n8n.example/validate'])"
        ));
        assert_eq!(
            settled,
            json!({ ok.to_string(): "processed", busy.to_string(): "failed", bad.to_string(): "failed", gone.to_string(): "failed" })
        );
        assert_eq!(
            count(&format!(
                "SELECT count(*) FROM marketing.pipeline_events
                 WHERE id = {busy} AND next_attempt_at BETWEEN now() + interval '59 seconds' AND now() + interval '61 seconds'"
            )),
            1,
            "Retry-After sets the next attempt"
        );
        assert_eq!(
            count("SELECT count(*) FROM marketing.pipeline_delivery_attempts"),
            4
        );
        assert_eq!(
            count("SELECT count(*) FROM marketing.pipeline_error_log"),
            3
        );
        assert_eq!(
            text("SELECT response_excerpt FROM marketing.pipeline_delivery_attempts WHERE outcome = 'failed'"),
            "bad field"
        );
        assert_eq!(
            value::<bool>("SELECT enabled FROM pipeline.webhooks"),
            Some(false),
            "410 disables"
        );

        // A stale outcome (its lease ran out and the event was claimed again) changes nothing.
        run(&format!("UPDATE marketing.pipeline_events SET status = 'processing', attempts = 2 WHERE id = {bad}"));
        let stale = count(&format!(
            "SELECT count(*) FROM pipeline._record_deliveries(ARRAY[{bad}]::bigint[], ARRAY[1], ARRAY['delivered'],
                 ARRAY[200], ARRAY[NULL]::text[], ARRAY[NULL]::integer[], ARRAY[1], ARRAY[NULL]::text[],
                 ARRAY['https://n8n.example/validate'])"
        ));
        assert_eq!(stale, 0);
        assert_eq!(
            text(&format!(
                "SELECT status FROM marketing.pipeline_events WHERE id = {bad}"
            )),
            "processing"
        );
    }

    #[pg_test]
    fn an_events_attempts_go_with_it() {
        run("SELECT pipeline.register_webhook('company_created', 'https://n8n.example/validate')");
        run("SELECT pipeline.emit('company_created', jsonb_build_object('n', n)) FROM generate_series(1, 4) n");
        // Two attempts each: a retry, then a delivery.
        for outcome in ["retry", "delivered"] {
            run("UPDATE marketing.pipeline_events SET next_attempt_at = now()");
            run(&format!(
                "SELECT count(*) FROM (SELECT array_agg(event_id) AS ids, array_agg(attempt) AS attempts
                                       FROM pipeline._claim_deliveries(10)) c,
                     pipeline._record_deliveries(c.ids, c.attempts, array_fill('{outcome}'::text, ARRAY[4]),
                         array_fill(200, ARRAY[4]), NULL, NULL, array_fill(1, ARRAY[4]), NULL,
                         array_fill('https://n8n.example/validate'::text, ARRAY[4]))"
            ));
        }
        let attempts = || count("SELECT count(*) FROM marketing.pipeline_delivery_attempts");
        assert_eq!(attempts(), 8);
        let first = count("SELECT min(id) FROM marketing.pipeline_events");

        run(&format!(
            "DELETE FROM marketing.pipeline_events WHERE id = {first}"
        ));
        assert_eq!(attempts(), 6);
        assert_eq!(
            count(&format!(
                "SELECT count(*) FROM marketing.pipeline_delivery_attempts WHERE event_id = {first}"
            )),
            0,
            "a deleted event's attempts go with it"
        );

        // (The purge deletes delivered events by partitions and by rows,
        // with their attempts: tests/partitions.rs, in a cluster of its own,
        // since moving the id sequence on is not undone by a rollback.)

        // Deleting events takes DELETE on the attempts as well.
        run("CREATE ROLE pipeline_test_cleaner NOSUPERUSER");
        run("GRANT SELECT, DELETE ON marketing.pipeline_events TO pipeline_test_cleaner");
        run("GRANT USAGE ON SCHEMA tests TO pipeline_test_cleaner");
        run("SET LOCAL ROLE pipeline_test_cleaner");
        assert_error(
            "DELETE FROM marketing.pipeline_events",
            "permission denied for table pipeline_delivery_attempts",
        );
        run("RESET ROLE");
        assert_eq!(events(), 3, "a refused delete deletes nothing");

        // TRUNCATE: tests/trigger_only.rs (it would lock out the tests running beside this one).
    }

    #[pg_test]
    fn claims_name_their_deliverer_for_status() {
        run("SELECT pipeline.register_webhook('company_created', 'https://n8n.example/validate')");
        run("SELECT pipeline.emit('company_created', '{}')");
        let last = || text("SELECT coalesce(last_deliverer, '-') FROM pipeline.status()");
        assert_eq!(last(), "-");
        assert_eq!(
            count("SELECT count(*) FROM pipeline._claim_deliveries(10, NULL, 'relay-a', ARRAY['company_created'])"),
            0
        );
        assert_eq!(last(), "-", "a claim that takes nothing names no one");
        assert_eq!(
            count("SELECT count(*) FROM pipeline._claim_deliveries(10, NULL, 'relay-a')"),
            1
        );
        assert_eq!(last(), "relay-a");
        assert_eq!(
            count("SELECT count(*) FROM pipeline.status() WHERE last_deliverer_active_at = now()"),
            1
        );
        run("UPDATE pipeline.deliverers SET last_active_at = now() - interval '30 days'");
        run("SELECT pipeline.purge(interval '7 days', 10)");
        assert_eq!(last(), "-", "idle deliverers go with the purge");
    }

    #[pg_test]
    fn events_of_an_endpoint_without_credentials_are_not_due() {
        run("SELECT pipeline.register_webhook('company_created', 'https://n8n.example/validate')");
        run("SELECT pipeline.emit('company_created', '{}')");
        assert_eq!(
            count(
                "SELECT count(*) FROM pipeline._next_due_in() WHERE pipeline._next_due_in() <= 0"
            ),
            1
        );
        // As after a restore that leaves the secrets out.
        run("DELETE FROM pipeline.webhook_credentials");
        assert_eq!(
            count("SELECT count(*) FROM pipeline._claim_deliveries(10)"),
            0
        );
        assert_eq!(
            count("SELECT count(*) FROM pipeline._next_due_in() WHERE pipeline._next_due_in() IS NULL"),
            1,
            "nothing is due that cannot be claimed (a deliverer would spin)"
        );
    }

    #[pg_test]
    fn webhooks_release_purge_and_status() {
        run("SELECT pipeline.register_webhook('company_created', 'https://n8n.example/validate')");
        run("SELECT pipeline.emit('company_created', '{}') FROM generate_series(1, 3)");
        let claimed: Vec<(i64, i32)> = json("SELECT jsonb_agg(jsonb_build_array(event_id, attempt)) FROM pipeline._claim_deliveries(10)")
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p[0].as_i64().unwrap(), p[1].as_i64().unwrap() as i32))
            .collect();
        let (first, attempt) = claimed[0];
        assert_eq!(
            count(&format!(
                "SELECT pipeline._release(ARRAY[{first}], ARRAY[{attempt}])::bigint"
            )),
            1
        );
        assert_eq!(
            text(&format!("SELECT format('%s %s', status, attempts) FROM marketing.pipeline_events WHERE id = {first}")),
            "pending 0",
            "an unsent claim is not an attempt"
        );

        let status = json("SELECT to_jsonb(s) FROM pipeline.status() s");
        assert_eq!(
            status["worker_running"], false,
            "no worker in the test cluster"
        );
        assert_eq!(status["pending"], 1);
        assert_eq!(status["processing"], 2);
        assert_eq!(status["endpoints_enabled"], 1);

        run("INSERT INTO marketing.pipeline_events (event_type, payload, status, created_at, processed_at)
             SELECT 'company_created', '{}', 'processed', now() - interval '30 days', now() - interval '30 days'
             FROM generate_series(1, 25)");
        assert_eq!(
            count("SELECT pipeline.purge(interval '0', 10)"),
            0,
            "retention 0 keeps everything"
        );
        run("DELETE FROM marketing.pipeline_events WHERE status = 'processed'");
        assert_eq!(
            count("SELECT count(*) FROM marketing.pipeline_events"),
            3,
            "recent and undelivered events stay"
        );
        let health = json("SELECT to_jsonb(h) FROM marketing.vw_endpoint_health h");
        assert_eq!(health["waiting"], 3);
        assert_eq!(health["enabled"], true);
    }
}

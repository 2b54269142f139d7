//! The stage functions the receivers call (sql/009_stage_work.sql).

#[pgrx::pg_schema]
mod tests {
    use crate::tests::*;
    use serde_json::json;

    fn intake(company: &str, website: Option<&str>) -> i64 {
        let website = website.map_or("NULL".to_string(), |w| format!("'{w}'"));
        count(&format!(
            "INSERT INTO intake.company_raw_intake (company, website) VALUES ('{company}', {website}) RETURNING id"
        ))
    }

    fn outcome(id: i64) -> serde_json::Value {
        json(&format!(
            "SELECT to_jsonb(v) FROM pipeline.validate_company({id}) v"
        ))
    }

    #[pg_test]
    fn website_rules_agree_with_the_company_master_check() {
        // (website, the reason validation gives, or None when usable)
        let cases: [(Option<&str>, Option<&str>); 19] = [
            (Some("https://acme.example"), None),
            (Some("http://www.Initrode.example:8080/about?x=1#top"), None),
            (Some("https://bücher.example"), None),
            (None, Some("website is missing")),
            (Some("   "), Some("website is missing")),
            (Some("https://nodot"), Some("website host has no dot")),
            (
                Some("https://exa mple.example"),
                Some("website contains spaces"),
            ),
            // A bare domain, as CSV exports write it, is read as https://.
            (Some("acme.example"), None),
            (Some(" www.acme.example/team "), None),
            (Some("https://trailing-dot.example."), None),
            (
                Some("see linkedin"),
                Some("website is not an http(s) URL or a domain name"),
            ),
            (
                Some("ftp://acme.example"),
                Some("website is not an http(s) URL or a domain name"),
            ),
            (
                Some("https://user:pw@acme.example"),
                Some("website has a user name or password in it"),
            ),
            (Some("https:///acme.example"), Some("website has no host")),
            (
                Some("https://acme.example:123456"),
                Some("website is not a valid http(s) URL"),
            ),
            (Some("https://acme."), Some("website host has no dot")),
            (
                Some("https://.example"),
                Some("website host has an empty label"),
            ),
            (
                Some("https://a..example"),
                Some("website host has an empty label"),
            ),
            (
                Some("acme"),
                Some("website is not an http(s) URL or a domain name"),
            ),
        ];
        for (n, (website, reason)) in cases.iter().enumerate() {
            let literal = website.map_or("NULL".to_string(), |w| format!("'{w}'"));
            let problem = value::<String>(&format!("SELECT pipeline.website_problem({literal})"));
            assert_eq!(problem.as_deref(), *reason, "website_problem({literal})");
            // The table's CHECK is the same rule: what validation accepts,
            // promotion stores (as pipeline.website_url reads it) and the next
            // stage's table takes. (It may take more: a host with an empty
            // label, which validation refuses.)
            let refused = error_of(&format!(
                "INSERT INTO marketing.company_master (company_name, website)
                 VALUES ('Case {n}', pipeline.website_url({literal}))"
            ));
            // NB: by the CHECK's name: a case may repeat an earlier domain.
            let by_check = refused.as_deref().is_some_and(|e| {
                e.contains("website_is_http_url") || e.contains("not-null constraint")
            });
            if reason.is_none() {
                assert!(
                    !by_check,
                    "company_master refused website {literal}: {refused:?}"
                );
            } else if !reason.unwrap().contains("empty label") {
                assert!(
                    by_check,
                    "company_master took website {literal}: {refused:?}"
                );
            }
        }
        // One spelling per host: case, www., a trailing dot, a bare domain and
        // the two forms of an internationalised name are one company.
        for (website, domain) in [
            ("HTTPS://WWW.Acme.Example/path", "acme.example"),
            ("acme.example.", "acme.example"),
            ("https://trailing-dot.example.", "trailing-dot.example"),
            (
                "https://münchen-idn.example/impressum",
                "xn--mnchen-idn-9db.example",
            ),
            (
                "http://XN--MNCHEN-IDN-9DB.example",
                "xn--mnchen-idn-9db.example",
            ),
            ("https://MÜNCHEN-IDN.example", "xn--mnchen-idn-9db.example"),
            ("https://bücher.example", "xn--bcher-kva.example"),
            ("https://例え.テスト", "xn--r8jz45g.xn--zckzah"),
            ("https://ÉCOLE.example", "xn--cole-9oa.example"),
            ("https://пример.example", "xn--e1afmkfd.example"),
        ] {
            assert_eq!(
                text(&format!("SELECT pipeline.website_domain('{website}')")),
                domain,
                "{website}"
            );
        }
        assert_eq!(
            text("SELECT pipeline.website_url(' acme.example/team ')"),
            "https://acme.example/team"
        );
        assert_eq!(
            text("SELECT domain FROM marketing.company_master WHERE company_name = 'Case 1'"),
            "initrode.example"
        );
    }

    #[pg_test]
    fn validate_company_decides_every_row_with_its_reasons() {
        let good = intake("Acme", Some("https://www.acme.example/"));
        let nothing = intake("No Site", None);
        let nodot = intake("Nodot", Some("https://nodot"));
        let spaced = intake("Spaced", Some("https://exa mple.example"));
        assert_eq!(
            outcome(good),
            json!({ "id": good, "validation_status": "valid", "validation_errors": [], "domain": "acme.example" })
        );
        for (id, reason) in [
            (nothing, "website is missing"),
            (nodot, "website host has no dot"),
            (spaced, "website contains spaces"),
        ] {
            assert_eq!(
                outcome(id),
                json!({ "id": id, "validation_status": "invalid", "validation_errors": [reason], "domain": null })
            );
            let row = json(&format!(
                "SELECT to_jsonb(r) FROM intake.company_raw_intake r WHERE id = {id}"
            ));
            assert_eq!(row["validated"], false);
            assert!(!row["validated_at"].is_null(), "decided: {row}");
        }
        // Only the valid row goes on.
        assert_eq!(events_of("company_validated").len(), 1);

        // Again: the same answer, nothing written.
        let at = text(&format!(
            "SELECT validated_at::text FROM intake.company_raw_intake WHERE id = {good}"
        ));
        assert_eq!(outcome(good)["validation_status"], "valid");
        assert_eq!(
            text(&format!(
                "SELECT validated_at::text FROM intake.company_raw_intake WHERE id = {good}"
            )),
            at
        );
        assert_eq!(events_of("company_validated").len(), 1);

        // A second row of the same company, before and after promotion.
        let twin = intake("Acme Inc", Some("http://acme.example"));
        assert_eq!(
            outcome(twin)["validation_errors"],
            json!([format!(
                "duplicate: acme.example is the domain of intake row {good}, already valid"
            )])
        );
        let company = count(&format!("SELECT pipeline.promote_company({good})"));
        let late = intake("ACME", Some("https://ACME.example/contact"));
        assert_eq!(
            outcome(late)["validation_errors"],
            json!([format!(
                "duplicate: acme.example is already promoted (company_master id {company})"
            )])
        );

        assert_error(
            "SELECT * FROM pipeline.validate_company(-1)",
            "intake row -1 does not exist",
        );
        assert_error(
            "SELECT * FROM pipeline.validate_company(NULL)",
            "intake_id must not be NULL",
        );
    }

    #[pg_test]
    fn promote_company_is_idempotent_and_says_why_it_cannot() {
        let good = intake("Globex", Some("https://globex.example"));
        outcome(good);
        let company = count(&format!("SELECT pipeline.promote_company({good})"));
        assert_eq!(
            count(&format!("SELECT pipeline.promote_company({good})")),
            company
        );
        assert_eq!(events_of("company_promoted").len(), 1);
        assert_eq!(count("SELECT count(*) FROM marketing.company_master"), 1);

        let pending = intake("Initech", Some("https://initech.example"));
        assert_error(
            &format!("SELECT pipeline.promote_company({pending})"),
            &format!("intake row {pending} is not valid (validation_status pending)"),
        );
        assert_error(
            "SELECT pipeline.promote_company(-5)",
            "intake row -5 does not exist",
        );

        // A company entered by hand holds the domain that validation let
        // through before it existed.
        outcome(pending);
        let by_hand = count(
            "INSERT INTO marketing.company_master (company_name, website)
             VALUES ('Initech by hand', 'https://www.initech.example') RETURNING id",
        );
        assert_error(
            &format!("SELECT pipeline.promote_company({pending})"),
            &format!("has the domain initech.example, already promoted as company_master id {by_hand} (from intake row none)"),
        );
    }

    #[pg_test]
    fn create_slots_is_idempotent_and_checks_its_input() {
        let id = intake("Umbrella", Some("https://umbrella.example"));
        outcome(id);
        let company = count(&format!("SELECT pipeline.promote_company({id})"));
        assert_eq!(
            count(&format!("SELECT pipeline.create_slots({company})::bigint")),
            2
        );
        assert_eq!(
            count(&format!("SELECT pipeline.create_slots({company})::bigint")),
            0
        );
        assert_eq!(
            count(&format!(
                "SELECT pipeline.create_slots({company}, '{{ceo,cto}}')::bigint"
            )),
            1
        );
        assert_eq!(
            text(&format!(
                "SELECT string_agg(slot_role, ',' ORDER BY slot_role) FROM marketing.company_slots WHERE company_id = {company}"
            )),
            "ceo,cfo,cto"
        );
        assert_eq!(events_of("slots_created").len(), 2);
        assert_error(
            "SELECT pipeline.create_slots(-3)",
            "company_master id -3 does not exist",
        );
        assert_error(
            &format!("SELECT pipeline.create_slots({company}, '{{}}')"),
            "roles must name at least one role",
        );
        assert_error(
            &format!("SELECT pipeline.create_slots({company}, '{{Chief Executive}}')"),
            "slot_role_format",
        );
    }

    /// A promoted company with its two slots; returns (company id, ceo slot id).
    fn slots_of(name: &str, domain: &str) -> (i64, i64) {
        let id = intake(name, Some(&format!("https://{domain}")));
        outcome(id);
        let company = count(&format!("SELECT pipeline.promote_company({id})"));
        count(&format!("SELECT pipeline.create_slots({company})::bigint"));
        let ceo = count(&format!(
            "SELECT id FROM marketing.company_slots WHERE company_id = {company} AND slot_role = 'ceo'"
        ));
        (company, ceo)
    }

    fn slot(id: i64) -> serde_json::Value {
        json(&format!(
            "SELECT to_jsonb(s) - 'created_at' - 'enriched_at' FROM marketing.company_slots s WHERE id = {id}"
        ))
    }

    #[pg_test]
    fn record_enrichment_maps_the_first_person_or_marks_not_found() {
        let (company, ceo) = slots_of("Stark", "stark.example");
        // The first item without a name or a usable email is passed over;
        // an email the table would refuse is left out, not fatal.
        let items = r#"[{"note": "nobody"}, "junk",
                        {"fullName": " Pepper Potts ", "jobTitle": "CEO", "email": " Pepper@Stark.Example ",
                         "linkedinUrl": "https://linkedin.example/in/pepper", "phone": "+1 555 0100"},
                        {"fullName": "Someone Else"}]"#;
        assert_eq!(
            text(&format!(
                "SELECT pipeline.record_enrichment({ceo}, '{items}')"
            )),
            "enriched"
        );
        let filled = slot(ceo);
        assert_eq!(filled["full_name"], "Pepper Potts");
        assert_eq!(filled["title"], "CEO");
        assert_eq!(filled["email"], "pepper@stark.example");
        assert_eq!(filled["linkedin_url"], "https://linkedin.example/in/pepper");
        assert_eq!(filled["phone"], "+1 555 0100");
        assert_eq!(filled["enrichment_source"], "apify");
        assert_eq!(events_of("contact_enriched").len(), 1);
        // Again, or with another answer: the slot stays as it was.
        assert_eq!(
            text(&format!(
                "SELECT pipeline.record_enrichment({ceo}, '[{{\"fullName\": \"Tony\"}}]')"
            )),
            "enriched"
        );
        assert_eq!(slot(ceo), filled);
        assert_eq!(events_of("contact_enriched").len(), 1);

        let cfo = count(&format!(
            "SELECT id FROM marketing.company_slots WHERE company_id = {company} AND slot_role = 'cfo'"
        ));
        assert_eq!(
            text(&format!(
                "SELECT pipeline.record_enrichment({cfo}, '[{{\"fullName\": \"\", \"email\": \"not an email\"}}]')"
            )),
            "not_found"
        );
        assert_eq!(slot(cfo)["enrichment_status"], "not_found");
        assert!(slot(cfo)["email"].is_null());

        let (_, other) = slots_of("Wayne", "wayne.example");
        assert_eq!(
            text(&format!(
                "SELECT pipeline.record_enrichment({other}, '[{{\"name\": \"Lucius Fox\", \"position\": \"CEO\"}}]')"
            )),
            "enriched"
        );
        assert_eq!(slot(other)["full_name"], "Lucius Fox");
        assert_eq!(slot(other)["title"], "CEO");
        assert!(slot(other)["email"].is_null());

        assert_error(
            "SELECT pipeline.record_enrichment(-1, '[]')",
            "slot -1 does not exist",
        );
        let (_, fresh) = slots_of("Oscorp", "oscorp.example");
        assert_error(
            &format!("SELECT pipeline.record_enrichment({fresh}, '{{\"items\": []}}')"),
            "items must be the JSON array of the actor's dataset items, not object",
        );
        assert_eq!(
            slot(fresh)["enrichment_status"],
            "pending",
            "refused: nothing changed"
        );
    }

    #[pg_test]
    fn record_verification_maps_millionverifier_and_raises_its_errors() {
        let (_, ceo) = slots_of("Acme Verify", "acmeverify.example");
        text(&format!(
            r#"SELECT pipeline.record_enrichment({ceo}, '[{{"fullName": "Wile E", "email": "wile@acmeverify.example"}}]')"#
        ));
        let answer = |result: &str, quality: &str, error: &str| {
            format!(
                r#"{{"email": "wile@acmeverify.example", "quality": "{quality}", "result": "{result}", "resultcode": 1,
                    "subresult": "ok", "free": false, "role": false, "didyoumean": "", "credits": 999,
                    "executiontime": 1, "error": "{error}", "livemode": true}}"#
            )
        };
        // The traps first: a bad key and an empty balance answer HTTP 200.
        assert_error(
            &format!(
                "SELECT pipeline.record_verification({ceo}, '{}')",
                answer("error", "", "Apikey not found")
            ),
            "millionverifier: Apikey not found",
        );
        assert_error(
            &format!(
                "SELECT pipeline.record_verification({ceo}, '{}')",
                answer("error", "", "Insufficient credits")
            ),
            "millionverifier: Insufficient credits",
        );
        assert_eq!(
            count("SELECT count(*) FROM marketing.email_verification"),
            0
        );
        for (result, quality, stored, score) in [
            ("ok", "good", "valid", json!(90.0)),
            ("catch_all", "risky", "catch_all", json!(50.0)),
            ("unknown", "", "unknown", json!(null)),
            ("disposable", "bad", "invalid", json!(10.0)),
            ("invalid", "bad", "invalid", json!(10.0)),
        ] {
            let id = count(&format!(
                "SELECT pipeline.record_verification({ceo}, '{}')",
                answer(result, quality, "")
            ));
            let row = json(&format!(
                "SELECT jsonb_build_object('result', result, 'score', score, 'provider', provider, 'details', details)
                 FROM marketing.email_verification WHERE id = {id}"
            ));
            assert_eq!(row["result"], stored, "{result}");
            assert_eq!(row["score"], score, "{result}");
            assert_eq!(row["provider"], "millionverifier");
            assert_eq!(row["details"]["credits"], 999);
            // The same answer again: the same row.
            assert_eq!(
                count(&format!(
                    "SELECT pipeline.record_verification({ceo}, '{}')",
                    answer(result, quality, "")
                )),
                id
            );
        }
        assert_eq!(
            count("SELECT count(*) FROM marketing.email_verification"),
            5
        );
        assert_error(
            &format!(
                "SELECT pipeline.record_verification({ceo}, '{}')",
                answer("ok", "good", "").replace("wile@", "coyote@")
            ),
            "the answer is about coyote@acmeverify.example",
        );
        assert_error(
            &format!(
                "SELECT pipeline.record_verification({ceo}, '{}')",
                answer("maybe", "good", "")
            ),
            r#"unknown result "maybe""#,
        );
        let (_, empty) = slots_of("No Mail", "nomail.example");
        assert_error(
            &format!(
                "SELECT pipeline.record_verification({empty}, '{}')",
                answer("ok", "good", "")
            ),
            "has no email to verify",
        );
    }
}

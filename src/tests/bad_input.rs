//! Bad input: each value gets a clear error or is stored exactly, and a
//! failed statement leaves neither rows nor events behind.

#[pgrx::pg_schema]
mod tests {
    use crate::tests::*;

    /// Rows in the four stage tables together.
    fn stage_rows() -> i64 {
        count(
            "SELECT (SELECT count(*) FROM intake.company_raw_intake) + (SELECT count(*) FROM marketing.company_master)
                  + (SELECT count(*) FROM marketing.company_slots) + (SELECT count(*) FROM marketing.email_verification)",
        )
    }

    /// Asserts that a statement fails naming `expected` and changes nothing.
    #[track_caller]
    fn rejected(sql: &str, expected: &str) {
        let (rows, before) = (stage_rows(), events());
        assert_error(sql, expected);
        assert_eq!(events(), before, "{sql}: no event may be written");
        assert_eq!(stage_rows(), rows, "{sql}: no row may be written");
    }

    #[pg_test]
    fn bad_company_names_are_refused() {
        let insert = |value: &str| {
            format!("INSERT INTO intake.company_raw_intake (company) VALUES ({value})")
        };
        rejected(&insert("NULL"), "null value in column \"company\"");
        rejected(&insert("''"), "company_not_blank");
        rejected(&insert("'   '"), "company_not_blank");
        rejected(&insert(r"U&'\00A0\200B\3000'"), "company_not_blank");
        rejected(&insert("repeat('a', 501)"), "company_max_500_chars");
        rejected(&insert("E'Acme\\nCorp'"), "company_no_control_chars");
        rejected(&insert("E'Acme\\tCorp'"), "company_no_control_chars");
        rejected(
            "INSERT INTO intake.company_raw_intake (company) VALUES ('Good One'), (''), ('Good Two')",
            "company_not_blank",
        );
        rejected(
            "INSERT INTO intake.company_raw_intake (company, website) VALUES ('Acme', repeat('w', 2049))",
            "website_max_2048_chars",
        );
        rejected(
            "INSERT INTO intake.company_raw_intake (company, employee_count) VALUES ('Acme', -1)",
            "employee_count_not_negative",
        );
        rejected(
            "INSERT INTO intake.company_raw_intake (company, validated) VALUES ('Acme', true)",
            "validated_means_valid",
        );
        rejected(
            "INSERT INTO intake.company_raw_intake (company, validation_status) VALUES ('Acme', 'maybe')",
            "validation_status_known",
        );
    }

    #[pg_test]
    fn odd_but_real_company_names_are_stored_exactly() {
        let names = [
            "a".repeat(500),
            "Ünïcödé Gesellschaft mbH".to_string(),
            "株式会社テスト".to_string(),
            "شركة الاختبار".to_string(),
            "🚀 Rocket Labs".to_string(),
            "Cafe\u{301} Combining".to_string(),
            "O'Brien & Sons \"Ltd\"".to_string(),
            "Robert'); DROP TABLE intake.company_raw_intake; --".to_string(),
            "1 OR 1=1; SELECT pg_sleep(10)".to_string(),
            "$$ || $tag$ \\x00 %s %n".to_string(),
        ];
        for name in &names {
            let id = value_with::<i64>(
                "INSERT INTO intake.company_raw_intake (company, website) VALUES ($1, $1) RETURNING id",
                &[name.as_str().into()],
            )
            .unwrap();
            assert_eq!(
                text(&format!(
                    "SELECT company FROM intake.company_raw_intake WHERE id = {id}"
                )),
                *name
            );
            let event = json(&format!(
                "SELECT payload FROM marketing.pipeline_events WHERE source_key = jsonb_build_object('id', {id}::bigint)"
            ));
            assert_eq!(
                event["new"]["company"],
                name.as_str(),
                "the event carries the name unchanged"
            );
            assert_eq!(
                event["new"]["website"],
                name.as_str(),
                "raw intake keeps any website text"
            );
        }
        assert!(
            value::<bool>("SELECT to_regclass('intake.company_raw_intake') IS NOT NULL").unwrap(),
            "SQL-looking text is only text"
        );
        assert_eq!(
            count("SELECT count(*) FROM marketing.pipeline_events WHERE event_type = 'company_created'"),
            names.len() as i64
        );
    }

    #[pg_test]
    fn promoted_websites_must_be_http_urls() {
        let insert = |website: &str| {
            format!("INSERT INTO marketing.company_master (company_name, website) VALUES ('Acme', {website})")
        };
        for bad in [
            "'acme.example'",
            "'ftp://acme.example'",
            "'javascript:alert(1)'",
            "'https://acme .example'",
            "'https://localhost'",
            "'https://'",
            "''",
            "'https://user@acme.example'",
        ] {
            rejected(&insert(bad), "website_is_http_url");
        }
        rejected(&insert("NULL"), "null value in column \"website\"");
        rejected(
            "INSERT INTO marketing.company_master (company_name, website) VALUES (' ', 'https://a.example')",
            "company_name_not_blank",
        );

        run(&insert("'https://WWW.Acme.Example/about?x=1'"));
        assert_eq!(
            text("SELECT domain FROM marketing.company_master WHERE company_name = 'Acme'"),
            "acme.example"
        );
        rejected(
            &insert("'http://acme.example'"),
            "company_master_domain_key",
        );
        rejected(
            "INSERT INTO marketing.company_master (intake_id, company_name, website) VALUES (987654321, 'X', 'https://x.example')",
            "company_master_intake_id_fkey",
        );
    }

    #[pg_test]
    fn slots_and_verifications_check_their_values() {
        let company = promoted_company("Acme", "acme.example");
        let slot = |values: &str| {
            format!("INSERT INTO marketing.company_slots (company_id, slot_role, enrichment_status, email) VALUES ({values})")
        };
        rejected(
            &slot(&format!("{company}, 'CEO ', 'pending', NULL")),
            "slot_role_format",
        );
        rejected(
            &slot(&format!("{company}, 'ceo', 'done', NULL")),
            "enrichment_status_known",
        );
        rejected(
            &slot(&format!("{company}, 'ceo', 'enriched', NULL")),
            "enriched_has_contact",
        );
        rejected(
            &slot(&format!("{company}, 'ceo', 'pending', 'not-an-email'")),
            "email_format",
        );
        rejected(
            &slot("987654321, 'ceo', 'pending', NULL"),
            "company_slots_company_id_fkey",
        );
        run(&slot(&format!("{company}, 'ceo', 'pending', NULL")));
        rejected(
            &slot(&format!("{company}, 'ceo', 'pending', NULL")),
            "company_slots_company_role_key",
        );

        let slot_id = count("SELECT id FROM marketing.company_slots WHERE slot_role = 'ceo'");
        let verification = |values: &str| {
            format!("INSERT INTO marketing.email_verification (slot_id, email, result, score) VALUES ({values})")
        };
        rejected(
            &verification(&format!("{slot_id}, 'a@acme.example', 'ok', NULL")),
            "result_known",
        );
        rejected(
            &verification(&format!("{slot_id}, 'a@acme.example', 'valid', 101")),
            "score_0_to_100",
        );
        rejected(
            &verification(&format!("{slot_id}, 'a @acme.example', 'valid', NULL")),
            "email_format",
        );
        rejected(
            &verification("987654321, 'a@acme.example', 'valid', NULL"),
            "email_verification_slot_id_fkey",
        );
    }

    #[pg_test]
    fn events_written_by_hand_are_checked_too() {
        let before = events();
        let insert = |columns: &str, values: &str| {
            format!("INSERT INTO marketing.pipeline_events ({columns}) VALUES ({values})")
        };
        let cases = [
            (
                insert("event_type, payload", "'Bad Type', '{}'"),
                "violates check constraint \"event_type_format\"",
            ),
            (
                insert("event_type, payload, status", "'ping', '{}', 'lost'"),
                "violates check constraint \"status_known\"",
            ),
            (
                insert("event_type, payload, source_op", "'ping', '{}', 'MERGE'"),
                "violates check constraint \"source_op_known\"",
            ),
            (
                insert("event_type, payload, status", "'ping', '{}', 'processed'"),
                "processed_at_iff_processed",
            ),
            (
                insert("event_type, payload", "'ping', NULL"),
                "null value in column \"payload\"",
            ),
        ];
        for (sql, expected) in cases {
            assert_error(&sql, expected);
        }
        assert_eq!(events(), before);
    }
}

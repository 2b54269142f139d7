//! The six stage events and stage 7 (outreach ready).

#[pgrx::pg_schema]
mod tests {
    use crate::tests::*;
    use serde_json::json;

    #[pg_test]
    fn stage_company_created_on_intake_insert() {
        let id = count(
            "INSERT INTO intake.company_raw_intake (company, website, import_batch_id)
             VALUES ('Test Company', 'https://test.example', 'batch-7') RETURNING id",
        );
        let created = events_of("company_created");
        assert_eq!(created.len(), 1);
        let event = &created[0];
        assert_eq!(event["status"], "pending");
        assert_eq!(event["attempts"], 0);
        assert_eq!(event["source_table"], "intake.company_raw_intake");
        assert_eq!(event["source_op"], "INSERT");
        assert_eq!(event["source_key"], json!({ "id": id }));
        assert_eq!(event["payload"]["new"]["company"], "Test Company");
        assert_eq!(event["payload"]["new"]["website"], "https://test.example");
        assert_eq!(event["payload"]["new"]["import_batch_id"], "batch-7");
        assert!(
            event["payload"].get("old").is_none(),
            "an INSERT has no old row"
        );
        // The seed's manual test: the newest event is the one just made.
        assert_eq!(
            text("SELECT event_type FROM marketing.pipeline_events ORDER BY created_at DESC, id DESC LIMIT 1"),
            "company_created"
        );
    }

    #[pg_test]
    fn stage_company_validated_only_when_validated_turns_true() {
        let id =
            count("INSERT INTO intake.company_raw_intake (company) VALUES ('Acme') RETURNING id");
        let set = |assignments: &str| {
            run(&format!(
                "UPDATE intake.company_raw_intake SET {assignments} WHERE id = {id}"
            ))
        };

        set("industry = 'software'");
        set("validated = false");
        assert_eq!(
            events_of("company_validated").len(),
            0,
            "nothing relevant changed"
        );

        set("validated = true, validation_status = 'valid'");
        let validated = events_of("company_validated");
        assert_eq!(validated.len(), 1);
        assert_eq!(validated[0]["source_op"], "UPDATE");
        assert_eq!(validated[0]["source_key"], json!({ "id": id }));
        assert_eq!(validated[0]["payload"]["old"]["validated"], false);
        assert_eq!(validated[0]["payload"]["new"]["validated"], true);
        assert_eq!(validated[0]["payload"]["new"]["industry"], "software");

        set("validated = true");
        set("city = 'Austin'");
        assert_eq!(
            events_of("company_validated").len(),
            1,
            "still validated: no new event"
        );

        set("validated = false, validation_status = 'pending'");
        set("validated = true, validation_status = 'valid'");
        assert_eq!(
            events_of("company_validated").len(),
            2,
            "validated again after a reset"
        );
    }

    #[pg_test]
    fn stage_company_promoted_on_master_insert() {
        let master = promoted_company("Globex", "globex.example");
        let promoted = events_of("company_promoted");
        assert_eq!(promoted.len(), 1);
        assert_eq!(promoted[0]["source_table"], "marketing.company_master");
        assert_eq!(promoted[0]["source_key"], json!({ "id": master }));
        assert_eq!(promoted[0]["payload"]["new"]["company_name"], "Globex");
        assert_eq!(promoted[0]["payload"]["new"]["domain"], "globex.example");
    }

    #[pg_test]
    fn stage_slots_created_once_per_company_per_statement() {
        let a = promoted_company("Initech", "initech.example");
        let b = promoted_company("Umbrella", "umbrella.example");
        run(&format!(
            "INSERT INTO marketing.company_slots (company_id, slot_role)
             VALUES ({a}, 'ceo'), ({a}, 'cfo'), ({a}, 'hr'), ({b}, 'ceo'), ({b}, 'cto')"
        ));
        let slots = events_of("slots_created");
        assert_eq!(slots.len(), 2, "one event per company: {slots:?}");
        let for_company = |id: i64| {
            slots
                .iter()
                .find(|e| e["source_key"] == json!({ "company_id": id }))
                .unwrap_or_else(|| panic!("no slots_created for company {id}: {slots:?}"))
        };
        let event_a = for_company(a);
        assert_eq!(event_a["payload"]["count"], 3);
        assert_eq!(event_a["payload"]["key"], json!({ "company_id": a }));
        let mut roles: Vec<_> = event_a["payload"]["new"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["slot_role"].as_str().unwrap().to_string())
            .collect();
        roles.sort();
        assert_eq!(roles, ["ceo", "cfo", "hr"]);
        assert_eq!(for_company(b)["payload"]["count"], 2);

        run(&format!(
            "INSERT INTO marketing.company_slots (company_id, slot_role) VALUES ({a}, 'cmo')"
        ));
        assert_eq!(
            events_of("slots_created").len(),
            3,
            "a later statement is a new event"
        );

        run("INSERT INTO marketing.company_slots (company_id, slot_role)
             SELECT company_id, slot_role FROM marketing.company_slots WHERE false");
        assert_eq!(
            events_of("slots_created").len(),
            3,
            "a statement with no rows emits nothing"
        );
    }

    #[pg_test]
    fn stage_contact_enriched_only_when_status_becomes_enriched() {
        let company = promoted_company("Hooli", "hooli.example");
        let slot = count(&format!(
            "INSERT INTO marketing.company_slots (company_id, slot_role) VALUES ({company}, 'ceo') RETURNING id"
        ));
        let set = |assignments: &str| {
            run(&format!(
                "UPDATE marketing.company_slots SET {assignments} WHERE id = {slot}"
            ))
        };

        set("enrichment_status = 'in_progress'");
        set("title = 'Chief Executive'");
        assert_eq!(events_of("contact_enriched").len(), 0);

        set("enrichment_status = 'enriched', full_name = 'Gavin Belson', email = 'gavin@hooli.example'");
        let enriched = events_of("contact_enriched");
        assert_eq!(enriched.len(), 1);
        assert_eq!(enriched[0]["source_key"], json!({ "id": slot }));
        assert_eq!(
            enriched[0]["payload"]["new"]["email"],
            "gavin@hooli.example"
        );
        assert_eq!(
            enriched[0]["payload"]["old"]["enrichment_status"],
            "in_progress"
        );

        set("phone = '+1 555 0100'");
        set("enrichment_status = 'enriched'");
        assert_eq!(
            events_of("contact_enriched").len(),
            1,
            "already enriched: no new event"
        );
    }

    #[pg_test]
    fn stage_email_verified_and_outreach_ready() {
        let company = promoted_company("Stark", "stark.example");
        let slot = count(&format!(
            "INSERT INTO marketing.company_slots (company_id, slot_role, full_name, email, enrichment_status)
             VALUES ({company}, 'ceo', 'Pepper Potts', 'pepper@stark.example', 'enriched') RETURNING id"
        ));
        let verify = |result: &str, at: &str| {
            run(&format!(
                "INSERT INTO marketing.email_verification (slot_id, email, result, verified_at)
                 VALUES ({slot}, 'pepper@stark.example', '{result}', '{at}')"
            ))
        };
        let ready = || {
            count(&format!(
                "SELECT count(*) FROM marketing.vw_outreach_ready WHERE slot_id = {slot}"
            ))
        };

        assert_eq!(ready(), 0, "not verified yet");
        verify("valid", "2026-01-01 10:00+00");
        let verified = events_of("email_verified");
        assert_eq!(verified.len(), 1);
        assert_eq!(verified[0]["payload"]["new"]["result"], "valid");
        assert_eq!(verified[0]["payload"]["new"]["slot_id"], slot);
        assert_eq!(ready(), 1);
        assert_eq!(
            text(&format!(
                "SELECT email FROM marketing.vw_outreach_ready WHERE slot_id = {slot}"
            )),
            "pepper@stark.example"
        );

        verify("invalid", "2026-01-02 10:00+00");
        assert_eq!(
            events_of("email_verified").len(),
            2,
            "every verification is an event"
        );
        assert_eq!(ready(), 0, "the newest verification counts");
    }

    #[pg_test]
    fn stage_notify_payload_stays_small_for_huge_rows() {
        // pg_notify raises "payload string too long" at call time for 8000
        // bytes or more, so the insert itself proves the payload is small.
        run("INSERT INTO intake.company_raw_intake (company, raw)
             VALUES (repeat('Ü', 500), jsonb_build_object('blob', repeat('x', 5000000)))");
        let created = events_of("company_created");
        assert_eq!(created.len(), 1);
        let blob = created[0]["payload"]["new"]["raw"]["blob"]
            .as_str()
            .unwrap();
        assert_eq!(blob.len(), 5_000_000, "the event keeps the whole row");
    }

    #[pg_test]
    fn stage_triggers_are_watches() {
        assert_eq!(
            count("SELECT count(*) FROM pipeline.watches WHERE builtin"),
            6,
            "six stages emit events"
        );
        assert_eq!(
            count(
                "SELECT count(*) FROM pipeline.stages s
                 JOIN pipeline.watches w USING (source_table, event_type, operation)
                 JOIN pg_trigger t ON t.tgrelid = w.source_table AND t.tgname = w.trigger_name
                 WHERE t.tgfoid = 'pipeline._capture_stage()'::regprocedure"
            ),
            6
        );
    }
}

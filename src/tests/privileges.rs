//! Who may do what: no code of a role runs with more rights than it has,
//! and no role writes events it could not produce by its own writes.
//! Each test takes on roles with SET LOCAL ROLE inside its transaction.

#[pgrx::pg_schema]
mod tests {
    use crate::tests::*;

    /// A role that may create tables in public and nothing of the pipeline
    /// but what every role has.
    fn role(name: &str) {
        run(&format!("CREATE ROLE {name} NOSUPERUSER"));
        run(&format!("GRANT CREATE, USAGE ON SCHEMA public TO {name}"));
        run(&format!("GRANT USAGE ON SCHEMA tests TO {name}"));
    }

    fn is_superuser(name: &str) -> bool {
        value::<bool>(&format!(
            "SELECT rolsuper FROM pg_roles WHERE rolname = '{name}'"
        ))
        .unwrap()
    }

    /// A table of `owner` with an enum column whose cast to json is the
    /// owner's code: turning a row into JSON runs it. It notes who it ran as
    /// and tries to make its owner a superuser.
    fn table_with_hostile_type(owner: &str) {
        run(&format!("SET LOCAL ROLE {owner}"));
        run("CREATE TABLE public.ran_as (who name, superuser boolean)");
        run("GRANT INSERT ON public.ran_as TO PUBLIC");
        run("CREATE TYPE public.mood AS ENUM ('calm')");
        run(&format!(
            "CREATE FUNCTION public.mood_json(public.mood) RETURNS json LANGUAGE plpgsql AS $$
             BEGIN
                 INSERT INTO public.ran_as SELECT current_user, r.rolsuper FROM pg_roles r WHERE r.rolname = current_user;
                 BEGIN
                     ALTER ROLE {owner} SUPERUSER;
                 EXCEPTION WHEN OTHERS THEN NULL;
                 END;
                 RETURN '\"calm\"';
             END $$"
        ));
        run("CREATE CAST (public.mood AS json) WITH FUNCTION public.mood_json(public.mood)");
        run("CREATE TABLE public.moods (id int PRIMARY KEY, mood public.mood)");
        run("RESET ROLE");
    }

    #[pg_test]
    fn a_watched_row_becomes_json_with_the_writers_rights() {
        role("pipeline_test_mallory");
        table_with_hostile_type("pipeline_test_mallory");
        // The owner of the pipeline watches the table: its rows now become events.
        run("SELECT pipeline.watch('public.moods', 'mood_logged')");
        run("SET LOCAL ROLE pipeline_test_mallory");
        run("INSERT INTO public.moods VALUES (1, 'calm')");
        run("UPDATE public.moods SET id = 2");
        run("RESET ROLE");
        assert_eq!(
            json("SELECT jsonb_agg(DISTINCT jsonb_build_array(who, superuser)) FROM public.ran_as"),
            serde_json::json!([["pipeline_test_mallory", false]]),
            "the type's code ran as the writer, never as a superuser"
        );
        assert!(!is_superuser("pipeline_test_mallory"));
        assert_eq!(events_of("mood_logged").len(), 1);
        assert_eq!(
            events_of("mood_logged")[0]["payload"]["new"]["mood"],
            "calm"
        );
    }

    #[pg_test]
    fn watching_and_emitting_need_a_grant_of_the_event_type() {
        role("pipeline_test_app");
        run("SET LOCAL ROLE pipeline_test_app");
        run("CREATE TABLE public.app_orders (id int PRIMARY KEY)");
        assert_error(
            "SELECT pipeline.watch('public.app_orders', 'order_placed')",
            "may not produce events of type 'order_placed'",
        );
        assert_error(
            "SELECT pipeline.emit('order_placed')",
            "may not produce events",
        );
        run("RESET ROLE");

        run("SELECT pipeline.grant_event_type('order_placed', 'pipeline_test_app')");
        run("SET LOCAL ROLE pipeline_test_app");
        assert_eq!(
            text("SELECT pipeline.watch('public.app_orders', 'order_placed')"),
            "pipeline_order_placed_insert"
        );
        run("INSERT INTO public.app_orders VALUES (1)");
        assert!(count("SELECT pipeline.emit('order_placed', '{\"by\": \"hand\"}')") > 0);
        // The stage types stay the pipeline's own.
        for stage in ["company_created", "company_validated", "email_verified"] {
            assert_error(
                &format!("SELECT pipeline.watch('public.app_orders', '{stage}', 'DELETE')"),
                "may not produce events",
            );
            assert_error(
                &format!("SELECT pipeline.emit('{stage}')"),
                "may not produce events",
            );
        }
        // Its own watch it may remove; the stage watches it may not.
        assert_eq!(
            count("SELECT pipeline.unwatch('public.app_orders', 'order_placed')"),
            1
        );
        assert_error(
            "SELECT pipeline.unwatch('marketing.company_master', 'company_promoted')",
            "may not remove the INSERT watch of company_promoted on marketing.company_master",
        );
        run("RESET ROLE");
        assert_eq!(events_of("order_placed").len(), 2);
        assert_eq!(events_of("company_created").len(), 0);
        assert_eq!(
            count("SELECT count(*) FROM pipeline.verify() WHERE status <> 'ok'"),
            0,
            "the stage watches are intact"
        );

        run("SELECT pipeline.revoke_event_type('order_placed', 'pipeline_test_app')");
        run("SET LOCAL ROLE pipeline_test_app");
        assert_error(
            "SELECT pipeline.emit('order_placed')",
            "may not produce events",
        );
        run("RESET ROLE");
    }

    #[pg_test]
    fn no_role_writes_events_its_own_writes_would_not_produce() {
        role("pipeline_test_forger");
        run("SELECT pipeline.grant_event_type('own_row', 'pipeline_test_forger')");
        run("SET LOCAL ROLE pipeline_test_forger");
        run("CREATE TABLE public.own (id int PRIMARY KEY)");
        run("SELECT pipeline.watch('public.own', 'own_row')");
        let forged = [
            // Straight into the queue, as a stage event.
            "INSERT INTO marketing.pipeline_events (event_type, payload, source_table, source_op)
             VALUES ('company_created', '{}', 'intake.company_raw_intake', 'INSERT')",
            // As its own type, but not from a trigger.
            "INSERT INTO marketing.pipeline_events (event_type, payload, source_table, source_op)
             VALUES ('own_row', '{}', 'public.own', 'INSERT')",
            // As an EMIT of a type it was not granted.
            "INSERT INTO marketing.pipeline_events (event_type, payload, source_op) VALUES ('company_created', '{}', 'EMIT')",
        ];
        for sql in forged {
            assert_error(sql, "row-level security");
        }
        // Delivery state is not its to set.
        assert_error(
            "INSERT INTO marketing.pipeline_events (event_type, payload, source_op, status) VALUES ('own_row', '{}', 'EMIT', 'processed')",
            "permission denied",
        );
        // From a trigger of its own, naming a watched table it cannot write.
        run(
            "CREATE FUNCTION public.forge() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 INSERT INTO marketing.pipeline_events (event_type, payload, source_table, source_op)
                 VALUES ('company_created', '{\"new\": {\"id\": 666}}', 'intake.company_raw_intake', 'INSERT');
                 RETURN NULL;
             END $$",
        );
        run("CREATE TABLE public.decoy (id int)");
        run("CREATE TRIGGER forge AFTER INSERT ON public.decoy FOR EACH ROW EXECUTE FUNCTION public.forge()");
        assert_error("INSERT INTO public.decoy VALUES (1)", "row-level security");
        // The capture function on a table it did not watch produces nothing either.
        run(
            "CREATE TRIGGER capture AFTER INSERT ON public.decoy FOR EACH ROW
             EXECUTE FUNCTION pipeline._capture('company_created', '')",
        );
        run("DROP TRIGGER forge ON public.decoy");
        assert_error("INSERT INTO public.decoy VALUES (1)", "row-level security");
        // Its watch works.
        run("INSERT INTO public.own VALUES (1)");
        run("RESET ROLE");
        assert_eq!(events_of("company_created").len(), 0);
        assert_eq!(events_of("own_row").len(), 1);

        // A writer of intake (the documented INSERT grant) forges no stage
        // event either: from a trigger of its own, naming another writer's
        // row and a made-up company, nothing gets in.
        run("GRANT USAGE ON SCHEMA intake TO pipeline_test_forger");
        run("GRANT INSERT ON intake.company_raw_intake TO pipeline_test_forger");
        run("SET LOCAL ROLE pipeline_test_forger");
        run("DROP TRIGGER capture ON public.decoy");
        run(
            "CREATE TRIGGER forge AFTER INSERT ON public.decoy FOR EACH ROW EXECUTE FUNCTION public.forge()",
        );
        assert_error("INSERT INTO public.decoy VALUES (2)", "row-level security");
        run("DROP TRIGGER forge ON public.decoy");
        // The sealed trigger function writes nothing for its triggers.
        run(
            "CREATE TRIGGER capture AFTER INSERT ON public.decoy FOR EACH ROW
             EXECUTE FUNCTION pipeline._capture_sealed('company_created', '')",
        );
        assert_error(
            "INSERT INTO public.decoy VALUES (3)",
            "runs only as the trigger of a watch",
        );
        // The stages' own, which looks up nothing, cannot be given a
        // trigger at all by anyone but the owner.
        assert_error(
            "CREATE TRIGGER stage AFTER INSERT ON public.decoy
             REFERENCING NEW TABLE AS pipeline_rows FOR EACH STATEMENT
             EXECUTE FUNCTION pipeline._capture_stage('company_created', '', 'id')",
            "permission denied for function pipeline._capture_stage",
        );
        assert_error(
            "CREATE TRIGGER stage AFTER INSERT ON public.decoy FOR EACH ROW
             EXECUTE FUNCTION pipeline._capture_stage('company_created', '', 'id')",
            "permission denied for function pipeline._capture_stage",
        );
        run("DROP TRIGGER capture ON public.decoy");
        // Its own intake row makes the genuine event.
        run("INSERT INTO intake.company_raw_intake (company, website) VALUES ('Real Co', 'https://real.example')");
        run("RESET ROLE");
        let created = events_of("company_created");
        assert_eq!(created.len(), 1);
        assert_eq!(created[0]["payload"]["new"]["company"], "Real Co");
    }

    #[pg_test]
    fn a_writer_of_a_users_watched_table_forges_no_event_of_it() {
        role("pipeline_test_shop");
        role("pipeline_test_clerk");
        run("SELECT pipeline.grant_event_type('order_made', 'pipeline_test_shop')");
        run("SET LOCAL ROLE pipeline_test_shop");
        run("CREATE TABLE public.shop_orders (id int PRIMARY KEY, note text, tags text[])");
        run("GRANT INSERT ON public.shop_orders TO pipeline_test_clerk");
        run("SELECT pipeline.watch('public.shop_orders', 'order_made')");
        run("RESET ROLE");
        // Plain columns: the watch is sealed.
        assert_eq!(
            value::<String>(
                "SELECT tgfoid::regprocedure::text FROM pg_trigger WHERE tgname = 'pipeline_order_made_insert'"
            )
            .as_deref(),
            Some("pipeline._capture_sealed()")
        );
        run("SET LOCAL ROLE pipeline_test_clerk");
        run(
            "CREATE FUNCTION public.forge_order() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 INSERT INTO marketing.pipeline_events (event_type, payload, source_table, source_op)
                 VALUES ('order_made', '{\"new\": {\"id\": 99, \"note\": \"made up\"}}', 'public.shop_orders', 'INSERT');
                 RETURN NULL;
             END $$",
        );
        run("CREATE TABLE public.clerk_scratch (id int)");
        run("CREATE TRIGGER forge AFTER INSERT ON public.clerk_scratch FOR EACH ROW EXECUTE FUNCTION public.forge_order()");
        assert_error(
            "INSERT INTO public.clerk_scratch VALUES (1)",
            "row-level security",
        );
        // Nor may its own trigger run the sealed function.
        run("DROP TRIGGER forge ON public.clerk_scratch");
        run("CREATE TRIGGER capture AFTER INSERT ON public.clerk_scratch
             REFERENCING NEW TABLE AS pipeline_rows FOR EACH STATEMENT
             EXECUTE FUNCTION pipeline._capture_sealed('order_made', '')");
        assert_error(
            "INSERT INTO public.clerk_scratch VALUES (2)",
            "runs only as the trigger of a watch",
        );
        run("SET LOCAL ROLE pipeline_test_shop");
        assert_error(
            "CREATE TRIGGER stage AFTER INSERT ON public.shop_orders
             REFERENCING NEW TABLE AS pipeline_rows FOR EACH STATEMENT
             EXECUTE FUNCTION pipeline._capture_stage('order_made', '', 'id')",
            "permission denied for function pipeline._capture_stage",
        );
        run("SET LOCAL ROLE pipeline_test_clerk");
        // Its real order is an event, as written.
        run("INSERT INTO public.shop_orders VALUES (1, 'real', '{a}')");
        run("RESET ROLE");
        let made = events_of("order_made");
        assert_eq!(made.len(), 1);
        assert_eq!(made[0]["payload"]["new"]["note"], "real");
    }

    #[pg_test]
    fn a_sealed_watch_whose_columns_change_refuses_rather_than_runs_their_code() {
        role("pipeline_test_mallory");
        run("SELECT pipeline.grant_event_type('mood_logged', 'pipeline_test_mallory')");
        table_with_hostile_type("pipeline_test_mallory");
        run("SET LOCAL ROLE pipeline_test_mallory");
        run("CREATE TABLE public.plain_moods (id int PRIMARY KEY)");
        run("SELECT pipeline.watch('public.plain_moods', 'mood_logged')");
        // Sealed while plain; then a column of its own type comes.
        run("ALTER TABLE public.plain_moods ADD COLUMN mood public.mood");
        assert_error(
            "INSERT INTO public.plain_moods VALUES (1, 'calm')",
            "was made for columns of plain types, and a column is of another type now",
        );
        // Watched again, the rows go through the writer's rights.
        run("SELECT pipeline.watch('public.plain_moods', 'mood_logged')");
        run("INSERT INTO public.plain_moods VALUES (1, 'calm')");
        run("RESET ROLE");
        assert_eq!(
            json("SELECT jsonb_agg(DISTINCT jsonb_build_array(who, superuser)) FROM public.ran_as"),
            serde_json::json!([["pipeline_test_mallory", false]]),
            "the type's code never ran as the owner"
        );
        assert_eq!(events_of("mood_logged").len(), 1);
    }

    #[pg_test]
    fn a_writer_that_may_only_insert_cannot_insert_a_decided_row() {
        role("pipeline_test_importer");
        run("GRANT USAGE ON SCHEMA intake, marketing TO pipeline_test_importer");
        run("GRANT INSERT ON intake.company_raw_intake, marketing.company_slots TO pipeline_test_importer");
        let company = promoted_company("Slot Co", "slot.example");
        run("SET LOCAL ROLE pipeline_test_importer");
        for decided in [
            "validated, validation_status) VALUES ('Fake Co', 'https://fake.example', true, 'valid'",
            "validation_status, validation_errors) VALUES ('Fake Co', 'https://fake.example', 'invalid', '{nope}'",
            "validated_at) VALUES ('Fake Co', 'https://fake.example', now()",
        ] {
            assert_error(
                &format!("INSERT INTO intake.company_raw_intake (company, website, {decided})"),
                "may not insert an intake row that is already validated",
            );
        }
        assert_error(
            &format!(
                "INSERT INTO marketing.company_slots (company_id, slot_role, full_name, enrichment_status)
                 VALUES ({company}, 'ceo', 'Fake Person', 'enriched')"
            ),
            "may not insert a slot that is already enriched",
        );
        // One decided row among undecided ones of the same statement.
        assert_error(
            "INSERT INTO intake.company_raw_intake (company, website, validation_status)
             VALUES ('A Co', 'https://a.example', 'pending'), ('B Co', 'https://b.example', 'invalid'),
                    ('C Co', 'https://c.example', 'pending')",
            "may not insert an intake row that is already validated",
        );
        assert_error(
            &format!(
                "INSERT INTO marketing.company_slots (company_id, slot_role, enrichment_source)
                 VALUES ({company}, 'cto', NULL), ({company}, 'coo', 'apify')"
            ),
            "may not insert a slot that is already enriched",
        );
        // Undecided rows go in.
        run("INSERT INTO intake.company_raw_intake (company, website) VALUES ('Ok Co', 'https://ok.example')");
        run(&format!(
            "INSERT INTO marketing.company_slots (company_id, slot_role) VALUES ({company}, 'cfo')"
        ));
        run("RESET ROLE");
        // Whoever may decide may insert a decided row.
        run("GRANT UPDATE (validation_status) ON intake.company_raw_intake TO pipeline_test_importer");
        run("SET LOCAL ROLE pipeline_test_importer");
        run(
            "INSERT INTO intake.company_raw_intake (company, website, validated, validation_status)
             VALUES ('Known Co', 'https://known.example', true, 'valid')",
        );
        run("RESET ROLE");
        assert_eq!(
            count("SELECT count(*) FROM intake.company_raw_intake WHERE company = 'Fake Co'"),
            0
        );
    }

    #[pg_test]
    fn watches_rows_cannot_be_forged_and_unwatch_drops_only_capture_triggers() {
        role("pipeline_test_forger");
        run("SELECT pipeline.grant_event_type('bogus', 'pipeline_test_forger')");
        run("SET LOCAL ROLE pipeline_test_forger");
        run("CREATE TABLE public.own (id int PRIMARY KEY)");
        // A row naming a stage table's trigger, or a trigger that is not there.
        for (table, trigger) in [
            (
                "marketing.company_master",
                "pipeline_company_promoted_insert",
            ),
            ("public.own", "pipeline_bogus_insert"),
        ] {
            assert_error(
                &format!(
                    "INSERT INTO pipeline.watches (source_table, event_type, operation, trigger_name)
                     VALUES ('{table}', 'bogus', 'INSERT', '{trigger}')"
                ),
                "row-level security",
            );
        }
        assert_error(
            "UPDATE pipeline.watches SET trigger_name = 'x'",
            "permission denied",
        );
        run("DELETE FROM pipeline.watches WHERE builtin");
        run("RESET ROLE");
        assert_eq!(
            count("SELECT count(*) FROM pipeline.watches WHERE builtin"),
            6
        );

        // Even a forged row that got in (the owner wrote it) names no trigger to drop.
        run(
            "INSERT INTO pipeline.watches (source_table, event_type, operation, trigger_name)
             VALUES ('marketing.company_master', 'bogus', 'INSERT', 'pipeline_company_promoted_insert')",
        );
        assert_eq!(
            count("SELECT pipeline.unwatch('marketing.company_master', 'bogus')"),
            1
        );
        assert_eq!(
            count(
                "SELECT count(*) FROM pg_trigger WHERE tgname = 'pipeline_company_promoted_insert'"
            ),
            1,
            "the stage trigger survived"
        );
    }

    #[pg_test]
    fn consumers_change_delivery_state_only() {
        role("pipeline_test_consumer");
        run(
            "GRANT SELECT, UPDATE (status, attempts, next_attempt_at, processed_at, last_error, replay_count, claimed_by)
             ON marketing.pipeline_events TO pipeline_test_consumer",
        );
        run(
            "GRANT SELECT, INSERT, UPDATE (resolved, resolved_at, resolution_note)
             ON marketing.pipeline_error_log TO pipeline_test_consumer",
        );
        let id = count("SELECT pipeline.emit('company_created', '{\"n\": 1}')");
        run("SET LOCAL ROLE pipeline_test_consumer");
        for column in [
            "payload = '{\"evil\": 1}'",
            "event_type = 'company_promoted'",
            "source_key = '{}'",
        ] {
            assert_error(
                &format!("UPDATE marketing.pipeline_events SET {column} WHERE id = {id}"),
                "permission denied",
            );
        }
        assert_eq!(
            count("SELECT count(*) FROM pipeline.claim(10, consumer => 'relay-1')"),
            1
        );
        assert!(value::<bool>(&format!("SELECT pipeline.mark_delivered({id})")).unwrap());
        assert_error("SELECT * FROM pipeline.webhooks", "permission denied");
        run("RESET ROLE");
        assert_eq!(
            events_of("company_created")[0]["payload"],
            serde_json::json!({"n": 1})
        );
    }

    #[pg_test]
    fn the_wake_trigger_serves_only_the_pipelines_tables() {
        role("pipeline_test_app");
        run("SET LOCAL ROLE pipeline_test_app");
        run("CREATE TABLE public.noisy (id int)");
        assert_error(
            "CREATE TRIGGER wake AFTER INSERT ON public.noisy FOR EACH STATEMENT EXECUTE FUNCTION pipeline._wake_worker()",
            "permission denied for function pipeline._wake_worker",
        );
        run("RESET ROLE");
        run("CREATE TABLE public.noisy2 (id int)");
        run("CREATE TRIGGER wake AFTER INSERT ON public.noisy2 FOR EACH STATEMENT EXECUTE FUNCTION pipeline._wake_worker()");
        assert_error(
            "INSERT INTO public.noisy2 VALUES (1)",
            "serves only marketing.pipeline_events",
        );
    }

    #[pg_test]
    fn a_lease_is_bounded_and_a_stuck_event_can_be_recovered() {
        let id = count("SELECT pipeline.emit('company_created')");
        assert_error(
            "SELECT * FROM pipeline.claim(1, '1000 years')",
            "at most 1 day",
        );
        assert_error(
            "SELECT * FROM pipeline.claim(1, '-1 second')",
            "lease must be positive",
        );
        assert_eq!(count("SELECT count(*) FROM pipeline.claim(1, '1 day')"), 1);
        assert_error(
            &format!("SELECT pipeline.replay({id})"),
            "being delivered right now",
        );
        assert_eq!(
            count(&format!("SELECT pipeline.replay({id}, force => true)")),
            id
        );
        let event = &events_of("company_created")[0];
        assert_eq!(event["status"], "pending");
        assert_eq!(
            event["attempts"], 1,
            "the attempt of the lost claim still counts"
        );
        // A late outcome of the lost claim (attempt 1) cannot settle the new one.
        assert_eq!(count("SELECT count(*) FROM pipeline.claim(1)"), 1);
        assert!(
            count(&format!(
                "SELECT count(*) FROM pipeline._settle(ARRAY[{id}::bigint], ARRAY[1], ARRAY[true], NULL, NULL, NULL, NULL)"
            )) == 0
        );
        assert_eq!(events_of("company_created")[0]["status"], "processing");
    }

    #[pg_test]
    fn a_restarted_consumer_takes_its_claims_back() {
        for _ in 0..3 {
            run("SELECT pipeline.emit('company_created')");
        }
        assert_eq!(
            count("SELECT count(*) FROM pipeline.claim(2, consumer => 'relay-1')"),
            2
        );
        assert_eq!(
            count("SELECT count(*) FROM pipeline.claim(1, consumer => 'relay-2')"),
            1
        );
        assert_eq!(count("SELECT pipeline.release_claims('relay-1')"), 2);
        assert_eq!(
            json("SELECT jsonb_agg(status ORDER BY id) FROM marketing.pipeline_events"),
            serde_json::json!(["pending", "pending", "processing"])
        );
    }

    #[pg_test]
    fn an_error_is_resolved_when_its_event_is_delivered() {
        let id = count("SELECT pipeline.emit('company_created')");
        run("SELECT * FROM pipeline.claim(1)");
        run(&format!(
            "SELECT pipeline.mark_failed({id}, 'HTTP 503', now())"
        ));
        assert_eq!(
            count("SELECT count(*) FROM marketing.vw_unresolved_errors"),
            1
        );
        run("UPDATE marketing.pipeline_events SET next_attempt_at = now()");
        run("SELECT * FROM pipeline.claim(1)");
        run(&format!("SELECT pipeline.mark_delivered({id})"));
        assert_eq!(
            count("SELECT count(*) FROM marketing.vw_unresolved_errors"),
            0
        );
        assert_eq!(
            text("SELECT resolution_note FROM marketing.pipeline_error_log"),
            "event delivered on attempt 2"
        );
    }

    #[pg_test]
    fn monitoring_needs_no_right_on_the_tables() {
        run("CREATE ROLE pipeline_test_monitor IN ROLE pg_monitor");
        run("GRANT USAGE ON SCHEMA tests TO pipeline_test_monitor");
        run("SELECT pipeline.register_webhook('company_created', 'https://n8n.example/x', secret => 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw')");
        run("SELECT pipeline.emit('company_created')");
        run("SELECT pipeline.emit('email_verified')");
        run("SELECT pipeline.emit('company_promoted')");
        run("SET LOCAL ROLE pipeline_test_monitor");
        let status = json("SELECT to_jsonb(s) FROM pipeline.status() s");
        assert_eq!(status["pending"], 1, "{status}");
        // company_promoted waits for an endpoint; email_verified is
        // recorded without delivery: no one's work.
        assert_eq!(status["without_endpoint"], 1, "{status}");
        assert_eq!(status["stuck_work"], 0, "{status}");
        // The rows of work name companies and addresses: counts only.
        for view in ["vw_work_progress", "vw_stuck_work"] {
            assert_error(
                &format!("SELECT count(*) FROM marketing.{view}"),
                "permission denied",
            );
        }
        for view in [
            "vw_pipeline_status",
            "vw_endpoint_health",
            "vw_pending_events",
            "vw_processing_latency",
            "vw_pipeline_funnel",
            "vw_unresolved_errors",
            "vw_error_rate_24h",
        ] {
            run(&format!("SELECT * FROM marketing.{view}"));
        }
        assert_error(
            "SELECT secret FROM pipeline.webhook_credentials",
            "permission denied",
        );
        assert_error(
            "SELECT headers FROM pipeline.webhook_credentials",
            "permission denied",
        );
        assert_error(
            "SELECT payload FROM marketing.pipeline_events",
            "permission denied",
        );
        run("RESET ROLE");
    }
}

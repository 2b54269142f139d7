//! pipeline.verify(): the self-check of an installation.

#[pgrx::pg_schema]
mod tests {
    use crate::tests::*;

    fn problems() -> serde_json::Value {
        json("SELECT coalesce(jsonb_object_agg(name, status), '{}') FROM pipeline.verify() WHERE status <> 'ok'")
    }

    #[pg_test]
    fn verify_all_ok_after_install() {
        assert_eq!(problems(), serde_json::json!({}));
        let kinds = json("SELECT jsonb_object_agg(kind, n) FROM (SELECT kind, count(*) AS n FROM pipeline.verify() GROUP BY kind) k");
        assert_eq!(kinds["schema"], 3);
        assert_eq!(kinds["table"], 18);
        assert_eq!(kinds["view"], 11);
        assert_eq!(kinds["work"], 1);
        assert_eq!(kinds["trigger"], 6);
    }

    #[pg_test]
    fn verify_reports_what_is_missing_or_disabled() {
        run("DROP TRIGGER pipeline_company_promoted_insert ON marketing.company_master");
        run("ALTER TABLE marketing.company_slots DISABLE TRIGGER pipeline_slots_created_insert");
        run("ALTER EXTENSION pipeline_ext DROP VIEW marketing.vw_error_rate_24h");
        run("DROP VIEW marketing.vw_error_rate_24h");
        assert_eq!(
            problems(),
            serde_json::json!({
                "marketing.company_master.pipeline_company_promoted_insert": "missing",
                "marketing.company_slots.pipeline_slots_created_insert": "disabled",
                "marketing.vw_error_rate_24h": "missing",
            })
        );
    }

    #[pg_test]
    fn verify_checks_user_watches_too() {
        run("CREATE TABLE public.tickets (id int PRIMARY KEY)");
        run("SELECT pipeline.watch('public.tickets', 'ticket_opened')");
        assert_eq!(
            text("SELECT status FROM pipeline.verify() WHERE name = 'public.tickets.pipeline_ticket_opened_insert'"),
            "ok"
        );
        run("DROP TRIGGER pipeline_ticket_opened_insert ON public.tickets");
        assert_eq!(
            problems(),
            serde_json::json!({ "public.tickets.pipeline_ticket_opened_insert": "missing" })
        );
    }
}

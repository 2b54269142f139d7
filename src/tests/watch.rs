//! pipeline.watch and pipeline.unwatch on tables of the user's own.

#[pgrx::pg_schema]
mod tests {
    use crate::tests::*;
    use serde_json::json;

    fn orders_table() {
        run("CREATE TABLE public.orders (
                 id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                 customer text NOT NULL,
                 status text NOT NULL DEFAULT 'new',
                 total numeric)");
    }

    fn triggers_on(table: &str) -> i64 {
        count(&format!(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = '{table}'::regclass AND NOT tgisinternal"
        ))
    }

    #[pg_test]
    fn watch_insert_then_unwatch() {
        orders_table();
        let trigger = text("SELECT pipeline.watch('public.orders', 'order_placed')");
        assert_eq!(trigger, "pipeline_order_placed_insert");
        assert_eq!(
            count("SELECT count(*) FROM pipeline.watches WHERE source_table = 'public.orders'::regclass"),
            1
        );

        let id =
            count("INSERT INTO public.orders (customer, total) VALUES ('ada', 12.50) RETURNING id");
        let placed = events_of("order_placed");
        assert_eq!(placed.len(), 1);
        assert_eq!(placed[0]["source_table"], "public.orders");
        assert_eq!(placed[0]["source_key"], json!({ "id": id }));
        assert_eq!(placed[0]["payload"]["new"]["customer"], "ada");
        assert_eq!(placed[0]["payload"]["new"]["total"], 12.5);

        assert_eq!(
            count("SELECT pipeline.unwatch('public.orders', 'order_placed')"),
            1
        );
        assert_eq!(triggers_on("public.orders"), 0);
        run("INSERT INTO public.orders (customer) VALUES ('bob')");
        assert_eq!(
            events_of("order_placed").len(),
            1,
            "no events after unwatch"
        );
        assert_eq!(
            count("SELECT pipeline.unwatch('public.orders', 'order_placed')"),
            0,
            "unwatching twice is harmless"
        );
    }

    #[pg_test]
    fn watch_update_with_columns_and_condition() {
        orders_table();
        run(
            "SELECT pipeline.watch('public.orders', 'order_shipped', 'update',
                 condition => $$NEW.status = 'shipped' AND OLD.status <> 'shipped'$$,
                 columns => '{status}')",
        );
        let id = count("INSERT INTO public.orders (customer) VALUES ('ada') RETURNING id");
        run(&format!(
            "UPDATE public.orders SET total = 3 WHERE id = {id}"
        ));
        run(&format!(
            "UPDATE public.orders SET status = 'packed' WHERE id = {id}"
        ));
        assert_eq!(events_of("order_shipped").len(), 0);
        run(&format!(
            "UPDATE public.orders SET status = 'shipped' WHERE id = {id}"
        ));
        let shipped = events_of("order_shipped");
        assert_eq!(shipped.len(), 1);
        assert_eq!(shipped[0]["payload"]["old"]["status"], "packed");
        assert_eq!(shipped[0]["payload"]["new"]["status"], "shipped");
        assert_eq!(shipped[0]["source_op"], "UPDATE");
    }

    #[pg_test]
    fn watch_delete_row_and_grouped() {
        orders_table();
        run("SELECT pipeline.watch('public.orders', 'order_deleted', 'DELETE')");
        run("SELECT pipeline.watch('public.orders', 'orders_purged', 'DELETE', group_by => 'customer')");
        run("INSERT INTO public.orders (customer) VALUES ('ada'), ('ada'), ('bob')");
        run("DELETE FROM public.orders");

        let deleted = events_of("order_deleted");
        assert_eq!(deleted.len(), 3);
        assert!(deleted.iter().all(|e| e["payload"].get("new").is_none()));
        assert!(deleted
            .iter()
            .all(|e| e["payload"]["old"]["customer"].is_string()));

        let purged = events_of("orders_purged");
        assert_eq!(purged.len(), 2);
        assert_eq!(purged[0]["source_key"], json!({ "customer": "ada" }));
        assert_eq!(purged[0]["payload"]["count"], 2);
        assert_eq!(purged[0]["payload"]["old"].as_array().unwrap().len(), 2);
        assert_eq!(purged[1]["source_key"], json!({ "customer": "bob" }));
    }

    #[pg_test]
    fn watch_again_replaces_the_definition() {
        orders_table();
        run("SELECT pipeline.watch('public.orders', 'order_changed', 'UPDATE')");
        run("SELECT pipeline.watch('public.orders', 'order_changed', 'UPDATE', condition => 'NEW.total > 100')");
        assert_eq!(triggers_on("public.orders"), 1);
        assert_eq!(
            text("SELECT condition FROM pipeline.watches WHERE event_type = 'order_changed'"),
            "NEW.total > 100"
        );
        run("INSERT INTO public.orders (customer, total) VALUES ('ada', 5)");
        run("UPDATE public.orders SET total = 50");
        run("UPDATE public.orders SET total = 500");
        assert_eq!(events_of("order_changed").len(), 1);
    }

    #[pg_test]
    fn watch_keys_composite_and_missing() {
        run("CREATE TABLE public.line_items (order_id int, line int, sku text, PRIMARY KEY (order_id, line))");
        run("CREATE TABLE public.audit_notes (note text)");
        run("SELECT pipeline.watch('public.line_items', 'line_added')");
        run("SELECT pipeline.watch('public.audit_notes', 'note_added')");
        run("INSERT INTO public.line_items VALUES (7, 2, 'X-1')");
        run("INSERT INTO public.audit_notes VALUES ('hello')");
        assert_eq!(
            events_of("line_added")[0]["source_key"],
            json!({ "order_id": 7, "line": 2 })
        );
        let note = &events_of("note_added")[0];
        assert!(
            note["source_key"].is_null(),
            "no primary key, no source_key"
        );
        assert_eq!(note["payload"]["new"]["note"], "hello");

        // The row trigger (UPDATE) and the statement trigger of a DELETE
        // read the same keys: from the new row, and from the old one.
        run("SELECT pipeline.watch('public.line_items', 'line_changed', 'UPDATE')");
        run("SELECT pipeline.watch('public.line_items', 'line_removed', 'DELETE')");
        run("SELECT pipeline.watch('public.audit_notes', 'note_changed', 'UPDATE')");
        run("UPDATE public.line_items SET sku = 'X-2'");
        run("DELETE FROM public.line_items");
        run("UPDATE public.audit_notes SET note = 'bye'");
        let changed = &events_of("line_changed")[0];
        assert_eq!(changed["source_key"], json!({ "order_id": 7, "line": 2 }));
        assert_eq!(changed["payload"]["old"]["sku"], "X-1");
        assert_eq!(changed["payload"]["new"]["sku"], "X-2");
        let removed = &events_of("line_removed")[0];
        assert_eq!(removed["source_key"], json!({ "order_id": 7, "line": 2 }));
        assert_eq!(
            removed["payload"],
            json!({ "old": { "order_id": 7, "line": 2, "sku": "X-2" } })
        );
        let note = &events_of("note_changed")[0];
        assert!(
            note["source_key"].is_null(),
            "no primary key, no source_key"
        );
        assert_eq!(note["payload"]["new"]["note"], "bye");
    }

    #[pg_test]
    fn watch_rejects_bad_arguments_and_leaves_nothing() {
        orders_table();
        run("CREATE VIEW public.orders_view AS SELECT * FROM public.orders");
        run(
            "CREATE FUNCTION public.other_trigger() RETURNS trigger LANGUAGE plpgsql
             AS $$ BEGIN RETURN NULL; END $$",
        );
        let cases = [
            ("SELECT pipeline.watch('public.no_such_table', 'x')", "relation \"public.no_such_table\" does not exist"),
            ("SELECT pipeline.watch(NULL, 'x')", "source_table must not be NULL"),
            ("SELECT pipeline.watch('public.orders_view', 'x')", "is not a table"),
            ("SELECT pipeline.watch('marketing.pipeline_events', 'x')", "cannot be watched"),
            ("SELECT pipeline.watch('pg_catalog.pg_class', 'x')", "cannot be watched"),
            ("SELECT pipeline.watch('marketing.pipeline_error_log', 'x')", "cannot be watched"),
            ("SELECT pipeline.watch('marketing.pipeline_delivery_attempts', 'x')", "cannot be watched"),
            ("SELECT pipeline.watch('pipeline.webhooks', 'x')", "cannot be watched"),
            ("SELECT pipeline.watch('public.orders', NULL)", "invalid event type NULL"),
            ("SELECT pipeline.watch('public.orders', '')", "invalid event type ''"),
            ("SELECT pipeline.watch('public.orders', 'Order Placed')", "invalid event type 'Order Placed'"),
            ("SELECT pipeline.watch('public.orders', repeat('a', 48))", "invalid event type"),
            ("SELECT pipeline.watch('public.orders', 'x''; DROP TABLE public.orders; --')", "invalid event type"),
            ("SELECT pipeline.watch('public.orders', 'x', 'TRUNCATE')", "operation must be INSERT, UPDATE or DELETE"),
            ("SELECT pipeline.watch('public.orders', 'x', 'INSERT', columns => '{status}')", "columns apply only to UPDATE"),
            ("SELECT pipeline.watch('public.orders', 'x', 'UPDATE', columns => '{}')", "columns is empty"),
            ("SELECT pipeline.watch('public.orders', 'x', 'UPDATE', columns => '{nope}')", "column nope of table public.orders does not exist"),
            ("SELECT pipeline.watch('public.orders', 'x', group_by => 'nope')", "column nope of table public.orders does not exist"),
            ("SELECT pipeline.watch('public.orders', 'x', group_by => 'customer', condition => 'true')", "group_by cannot be combined"),
            ("SELECT pipeline.watch('public.orders', 'x', condition => '  ')", "condition is blank"),
            ("SELECT pipeline.watch('public.orders', 'x', condition => 'NEW.nope = 1')", "column new.nope does not exist"),
            ("SELECT pipeline.watch('public.orders', 'x', condition => 'OLD.total > 1')", "cannot watch x on public.orders"),
            ("SELECT pipeline.watch('public.orders', 'x', condition => 'NEW.total >')", "syntax error"),
            (
                "SELECT pipeline.watch('public.orders', 'x', condition => 'true) EXECUTE FUNCTION public.other_trigger() --')",
                "condition closes a parenthesis it did not open",
            ),
            // Each way out of WHEN (...) into a statement of its own.
            (
                "SELECT pipeline.watch('public.orders', 'x', condition => 'true) EXECUTE FUNCTION pipeline._capture(''x''); CREATE TABLE public.planted (); CREATE TRIGGER t AFTER INSERT ON public.orders FOR EACH ROW WHEN (true')",
                "condition closes a parenthesis it did not open",
            ),
            ("SELECT pipeline.watch('public.orders', 'x', condition => 'true; CREATE TABLE public.planted ()')", "without ;"),
            ("SELECT pipeline.watch('public.orders', 'x', condition => 'NEW.total > 1 --')", "must not contain comments"),
            ("SELECT pipeline.watch('public.orders', 'x', condition => 'NEW.total > 1 /* x */')", "must not contain comments"),
            ("SELECT pipeline.watch('public.orders', 'x', condition => 'NEW.status = $q$a$q$')", "must not contain $"),
            ("SELECT pipeline.watch('public.orders', 'x', condition => 'NEW.status = E''\\'' OR true')", "backslash"),
            ("SELECT pipeline.watch('public.orders', 'x', condition => 'NEW.status = ''open')", "unterminated string"),
            ("SELECT pipeline.watch('public.orders', 'x', condition => 'NEW.\"status = 1')", "unterminated quoted identifier"),
            ("SELECT pipeline.watch('public.orders', 'x', condition => '(NEW.total > 1')", "leaves a parenthesis open"),
        ];
        for (sql, expected) in cases {
            assert_error(sql, expected);
        }
        assert_eq!(triggers_on("public.orders"), 0, "no trigger left behind");
        assert_eq!(
            count("SELECT count(*) FROM pipeline.watches WHERE NOT builtin"),
            0,
            "no watch left behind"
        );
    }

    #[pg_test]
    fn watch_of_a_dropped_table_can_be_removed() {
        orders_table();
        run("SELECT pipeline.watch('public.orders', 'order_placed')");
        let oid = count("SELECT 'public.orders'::regclass::oid::bigint");
        run("DROP TABLE public.orders");
        assert_eq!(
            text("SELECT status FROM pipeline.verify() WHERE kind = 'trigger' AND status <> 'ok'"),
            "missing table"
        );
        assert_eq!(
            count(&format!(
                "SELECT pipeline.unwatch({oid}::oid::regclass, 'order_placed')"
            )),
            1
        );
        assert_eq!(
            count("SELECT count(*) FROM pipeline.verify() WHERE status <> 'ok'"),
            0
        );
    }
}

//! The event history's partitions (sql/015_partitions.sql), what can be
//! checked in a transaction that is rolled back. Moving the id sequence on
//! is not undone by a rollback, and dropping a partition locks out the
//! tests running beside this one: the partitions' life (made ahead, moved
//! on, dropped, kept, dumped) is tested in tests/partitions.rs.

#[pgrx::pg_schema]
mod tests {
    use crate::tests::*;

    const WIDTH: i64 = 1 << 36;

    /// The partitions of the events, by number, in order.
    fn partitions() -> Vec<i64> {
        let list = text(
            "SELECT coalesce(string_agg(substr(c.relname, 17), ',' ORDER BY substr(c.relname, 17)::int), '')
             FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'marketing.pipeline_events'::regclass",
        );
        list.split(',')
            .filter(|k| !k.is_empty())
            .map(|k| k.parse().unwrap())
            .collect()
    }

    /// Each partition of the events has its attempts' partition of the same
    /// number and range.
    fn assert_attempts_alike() {
        let events = partitions();
        let attempts = text(
            "SELECT coalesce(string_agg(substr(c.relname, 28) || ' ' || pg_get_expr(c.relpartbound, c.oid), ';'
                                        ORDER BY substr(c.relname, 28)::int), '')
             FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'marketing.pipeline_delivery_attempts'::regclass",
        );
        let expected: Vec<String> = events
            .iter()
            .map(|k| {
                format!(
                    "{k} FOR VALUES FROM ('{}') TO ('{}')",
                    k * WIDTH,
                    (k + 1) * WIDTH
                )
            })
            .collect();
        assert_eq!(attempts, expected.join(";"));
    }

    #[pg_test]
    fn the_install_makes_the_first_partitions_with_their_indexes() {
        let made = partitions();
        assert_eq!(&made[..2], &[0, 1]);
        assert_attempts_alike();
        let id = count("SELECT pipeline.emit('company_created', '{}')");
        assert_eq!(
            text(&format!(
                "SELECT tableoid::regclass::text FROM marketing.pipeline_events WHERE id = {id}"
            )),
            format!("marketing.pipeline_events_{}", id / WIDTH)
        );
        assert_eq!(
            text(
                "SELECT string_agg(c.relname, ',' ORDER BY c.relname) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                 WHERE i.indrelid = 'marketing.pipeline_events_1'::regclass"
            ),
            "pipeline_events_1_created_idx,pipeline_events_1_dead_idx,pipeline_events_1_due_idx,\
             pipeline_events_1_pkey,pipeline_events_1_processed_idx"
        );
        assert_eq!(
            count("SELECT count(*) FROM pg_index WHERE indrelid = 'marketing.pipeline_events'::regclass"),
            0,
            "no index of the partitioned table (a restored partition would get it twice)"
        );
    }

    #[pg_test]
    fn adding_a_partition_twice_changes_nothing_and_numbers_are_checked() {
        assert_eq!(
            value::<bool>("SELECT pipeline._add_partitions(1)"),
            Some(false)
        );
        assert_eq!(
            value::<bool>("SELECT pipeline._add_partitions(9)"),
            Some(true)
        );
        assert_eq!(
            value::<bool>("SELECT pipeline._add_partitions(9)"),
            Some(false)
        );
        assert!(partitions().contains(&9));
        assert_attempts_alike();
        for k in ["-1", "131072", "NULL"] {
            assert_error(
                &format!("SELECT pipeline._add_partitions({k})"),
                "is outside 0 - 131071",
            );
        }
        // Made in this transaction: the sequence must not move into it.
        assert_eq!(
            value::<bool>("SELECT pipeline._committed('marketing.pipeline_events_9')"),
            Some(false)
        );
        assert_eq!(
            value::<bool>("SELECT pipeline._committed('marketing.pipeline_events_0')"),
            Some(true)
        );
    }

    #[pg_test]
    fn only_the_deliverers_maintain_partitions() {
        run("CREATE ROLE pipeline_test_operator NOSUPERUSER");
        run("GRANT SELECT, DELETE ON marketing.pipeline_events, marketing.pipeline_delivery_attempts TO pipeline_test_operator");
        run("GRANT UPDATE (status, processed_at, claimed_by) ON marketing.pipeline_events TO pipeline_test_operator");
        run("GRANT SELECT, DELETE ON pipeline.deliverers TO pipeline_test_operator");
        run("GRANT SELECT ON pipeline.webhooks TO pipeline_test_operator");
        run("GRANT USAGE ON SCHEMA tests TO pipeline_test_operator");
        run("SELECT pipeline.emit('company_created', '{}')");
        run("UPDATE marketing.pipeline_events SET status = 'processed', created_at = now() - interval '10 days',
                    processed_at = now() - interval '10 days'");
        run("SET LOCAL ROLE pipeline_test_operator");
        assert_error(
            "SELECT pipeline._maintain_partitions(interval '1 day')",
            "permission denied for function _maintain_partitions",
        );
        assert_error(
            "SELECT pipeline._add_partitions(3)",
            "permission denied for function _add_partitions",
        );
        // Its purge deletes by rows, wherever they are old.
        assert_eq!(count("SELECT pipeline.purge()"), 1);
        run("RESET ROLE");
        assert_eq!(
            value::<bool>(
                "SELECT has_function_privilege('pipeline_worker', 'pipeline._maintain_partitions(interval)', 'EXECUTE')"
            ),
            Some(true)
        );
        assert_eq!(
            value::<bool>(
                "SELECT has_function_privilege('pipeline_worker', 'pipeline._add_partitions(integer)', 'EXECUTE')"
            ),
            Some(false),
            "only through the maintenance"
        );
        assert_eq!(
            text("SELECT array_to_string(proconfig, ' ') FROM pg_proc WHERE oid = 'pipeline._maintain_partitions(interval)'::regprocedure AND prosecdef"),
            "search_path=pg_catalog, pg_temp lock_timeout=100ms enable_seqscan=off enable_bitmapscan=off jit=off \
             enable_hashjoin=off enable_mergejoin=off plan_cache_mode=force_generic_plan"
        );
    }

    #[pg_test]
    fn partitions_cannot_be_watched() {
        for table in [
            "marketing.pipeline_events_0",
            "marketing.pipeline_delivery_attempts_1",
        ] {
            assert_error(
                &format!("SELECT pipeline.watch('{table}', 'loop_event')"),
                &format!("pipeline.watch: {table} cannot be watched"),
            );
        }
    }
}

-- 015_partitions.sql: the event history in partitions, made ahead of need
-- and dropped whole; retention (pipeline.purge).
--
-- marketing.pipeline_events and marketing.pipeline_delivery_attempts are
-- partitioned by ranges of the event id: partition k holds the ids from
-- k * 2^36 up to (k + 1) * 2^36, as marketing.pipeline_events_<k> and
-- marketing.pipeline_delivery_attempts_<k>. One sequence numbers every
-- event; the deliverers' purge (pipeline.purge, every tenth of the
-- retention, at least once a minute) moves it to the start of the next
-- partition once the current one has held events for a span:
--
--   span = a quarter of pipeline.retention, at least an hour
--          (a week with retention 0, which keeps everything)
--
-- or once it is half full (2^35 events), so a retention keeps about six
-- partitions whatever it is (a week's: 1.75 days each). The partition after the current one is made
-- in an earlier transaction than the one that moves the sequence into it:
-- a write never finds no partition for its event.
--
-- Why ranges of id and not of created_at: events are found by id (a claim
-- settles by id; replays, the error log and receivers name events by id),
-- and a condition on id reaches one partition. 2^36 ids per partition keep
-- ids below 2^53 (receivers in JavaScript read them as numbers) for 131,072
-- partitions: 359 years of daily ones, 15 of hourly ones (a retention of
-- four hours or less).
--
-- Retention: a partition before the current one whose events were all
-- created and delivered longer than pipeline.retention ago is dropped with
-- its attempts (DROP TABLE: the disk comes back at once and VACUUM has
-- nothing to chase). A partition that still holds an event waiting for
-- delivery, or a dead one, is kept: dead events wait for a person
-- (pipeline.replay_failed, or deleting them). In such a partition the
-- delivered events older than the retention are deleted in batches, as
-- before partitions. Events of younger partitions wait for their partition:
-- a delivered event is kept for the retention and at most a span more (a
-- quarter of the retention, or an hour).
--
-- The floor of the claims (pipeline.settled_below, 006_queue.sql): the
-- purge sets it to the start of the oldest partition with an event waiting,
-- so that the deliverers' statements leave the partitions below it out.
--
-- Dropping a partition needs an ACCESS EXCLUSIVE lock on both tables for a
-- moment; it waits at most 100 ms for it (writers queue behind the wait),
-- and tries again at the next purge when it did not get it.
--
-- Partitions are made and dropped by pipeline._maintain_partitions, which
-- runs with its owner's rights (a deliverer may not create tables) and
-- takes nothing from its caller but an age. In the extension, the first two
-- partitions are made by CREATE EXTENSION and belong to it (pg_dump writes
-- their rows); later ones do not, so pg_dump writes them whole, as tables
-- attached to the extension's.

-- The partitions of number k of both tables, with their indexes (made on
-- the empty tables, then attached: attaching takes a SHARE UPDATE EXCLUSIVE
-- lock, which writers do not wait for, where CREATE TABLE ... PARTITION OF
-- takes an ACCESS EXCLUSIVE one). A table of that name that exists and is
-- not attached yet is attached (the upgrade makes the 0.1.0 table partition
-- 0 this way). Returns whether it made or attached anything.
CREATE FUNCTION pipeline._add_partitions(k integer) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    c_width    CONSTANT bigint := 68719476736;  -- 2^36
    v_events   text := 'pipeline_events_' || k;
    v_attempts text := 'pipeline_delivery_attempts_' || k;
    v_changed  boolean := false;
BEGIN
    IF k IS NULL OR k < 0 OR k >= 131072 THEN
        RAISE EXCEPTION 'pipeline._add_partitions: partition % is outside 0 - 131071', k
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF to_regclass(format('marketing.%I', v_events)) IS NULL THEN
        EXECUTE format('CREATE TABLE marketing.%I (LIKE marketing.pipeline_events INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                       v_events);
        EXECUTE format('ALTER TABLE marketing.%I ADD CONSTRAINT %I PRIMARY KEY (id)', v_events, v_events || '_pkey');
        -- Claims: per event type, "due events in order" is a range scan of
        -- this index, whatever the delivered history and however many events
        -- of other types wait (for an endpoint, say).
        EXECUTE format('CREATE INDEX %I ON marketing.%I (event_type, next_attempt_at, id) '
                       'WHERE status IN (''pending'', ''failed'', ''processing'')', v_events || '_due_idx', v_events);
        -- Recent events (ORDER BY created_at DESC) and time-range replays.
        EXECUTE format('CREATE INDEX %I ON marketing.%I (created_at)', v_events || '_created_idx', v_events);
        -- Dead events wait for a person: counting and listing them stays cheap.
        EXECUTE format('CREATE INDEX %I ON marketing.%I (created_at) WHERE status = ''dead''',
                       v_events || '_dead_idx', v_events);
        -- Latency views and retention of delivered events.
        EXECUTE format('CREATE INDEX %I ON marketing.%I (processed_at) WHERE status = ''processed''',
                       v_events || '_processed_idx', v_events);
        EXECUTE format('REVOKE ALL ON marketing.%I FROM PUBLIC', v_events);
    END IF;
    IF NOT EXISTS (SELECT FROM pg_inherits i WHERE i.inhrelid = format('marketing.%I', v_events)::regclass) THEN
        EXECUTE format('ALTER TABLE marketing.pipeline_events ATTACH PARTITION marketing.%I FOR VALUES FROM (%s) TO (%s)',
                       v_events, k * c_width, (k + 1) * c_width);
        v_changed := true;
    END IF;
    IF to_regclass(format('marketing.%I', v_attempts)) IS NULL THEN
        EXECUTE format('CREATE TABLE marketing.%I (LIKE marketing.pipeline_delivery_attempts INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                       v_attempts);
        EXECUTE format('ALTER TABLE marketing.%I ADD CONSTRAINT %I PRIMARY KEY (id)', v_attempts, v_attempts || '_pkey');
        EXECUTE format('CREATE INDEX %I ON marketing.%I (event_id, attempt)', v_attempts || '_event_idx', v_attempts);
        EXECUTE format('CREATE INDEX %I ON marketing.%I (created_at)', v_attempts || '_created_idx', v_attempts);
        EXECUTE format('REVOKE ALL ON marketing.%I FROM PUBLIC', v_attempts);
    END IF;
    IF NOT EXISTS (SELECT FROM pg_inherits i WHERE i.inhrelid = format('marketing.%I', v_attempts)::regclass) THEN
        EXECUTE format('ALTER TABLE marketing.pipeline_delivery_attempts ATTACH PARTITION marketing.%I FOR VALUES FROM (%s) TO (%s)',
                       v_attempts, k * c_width, (k + 1) * c_width);
        v_changed := true;
    END IF;
    RETURN v_changed;
END
$$;
REVOKE ALL ON FUNCTION pipeline._add_partitions(integer) FROM PUBLIC;
COMMENT ON FUNCTION pipeline._add_partitions(integer) IS
    'Makes (or attaches) partition k of marketing.pipeline_events and marketing.pipeline_delivery_attempts: event ids k * 2^36 to (k + 1) * 2^36.';

-- The partitions of the events and their numbers.
CREATE FUNCTION pipeline._event_partitions() RETURNS TABLE (events regclass, k integer)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT c.oid::regclass, substr(c.relname, 17)::integer
    FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
    WHERE i.inhparent = 'marketing.pipeline_events'::regclass
      AND c.relname ~ '^pipeline_events_[0-9]+$'
$$;
REVOKE ALL ON FUNCTION pipeline._event_partitions() FROM PUBLIC;

-- Whether a table's catalog row was written by a transaction that has
-- committed, and not by this one: the sequence may move only into a
-- partition that no rollback can take away again (setval is not undone by
-- one). From the row's xmin, widened to 64 bits by its distance to the
-- next xid (a subtransaction's may lie past it).
CREATE FUNCTION pipeline._committed(rel regclass) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN s.x < 3 THEN true  -- bootstrap and frozen
                ELSE coalesce(pg_xact_status((s.next + s.d - CASE WHEN s.d >= 2147483648 THEN 4294967296
                                                                   WHEN s.d < -2147483648 THEN -4294967296
                                                                   ELSE 0 END)::text::xid8) = 'committed',
                              true) END  -- NULL: too old to be known
    FROM (SELECT c.xmin::text::bigint AS x, n.next,
                 c.xmin::text::bigint - (n.next & 4294967295) AS d
          FROM pg_class c, (SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS next) n
          WHERE c.oid = rel) s
$$;
REVOKE ALL ON FUNCTION pipeline._committed(regclass) FROM PUBLIC;

-- What pipeline.purge runs first: makes the partition after the current
-- one, moves the sequence on when the current one has held events for a
-- span, and drops the partitions older than older_than whose events are all
-- delivered. Returns the id below which every partition left is older than
-- older_than (they hold waiting or dead events, or could not be dropped
-- now): pipeline.purge deletes delivered rows only there. 0 when another
-- transaction is at it, or when making a partition waited for a lock (then
-- nothing is deleted by rows this time).
-- NB: SECURITY DEFINER, for CREATE and DROP TABLE; only the deliverers'
-- roles may call it (pipeline_worker; pipeline-relay's role by the grant
-- docs/relay.md gives). Every name is qualified, and what is made or
-- dropped is decided by the catalog and the sequence, not by the caller.
CREATE FUNCTION pipeline._maintain_partitions(older_than interval) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    SET lock_timeout = '100ms'
    SET enable_seqscan = off SET enable_bitmapscan = off SET jit = off
    SET enable_hashjoin = off SET enable_mergejoin = off
    SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    c_width     CONSTANT bigint := 68719476736;  -- 2^36
    v_retention interval := pipeline._setting('retention', '7d')::interval;
    v_span      interval;
    v_seq       regclass := pg_get_serial_sequence('marketing.pipeline_events', 'id')::regclass;
    v_next      bigint;
    v_current   integer;
    v_first     timestamptz;
    v_part      record;
    v_newest    timestamptz;
    v_delivered timestamptz;
    v_open      boolean;
    v_attempts  regclass;
    v_table     regclass;
    v_bound     bigint;
    v_free      boolean;
    v_moved     boolean := false;
    v_floor     bigint;
BEGIN
    IF NOT pg_try_advisory_xact_lock('marketing.pipeline_events'::regclass::oid::integer, 15) THEN
        RETURN 0;
    END IF;
    v_span := CASE WHEN v_retention <= interval '0' THEN interval '7 days'
                   ELSE greatest(interval '1 hour', v_retention / 4) END;
    EXECUTE format('SELECT CASE WHEN s.is_called THEN s.last_value + 1 ELSE s.last_value END FROM %s s', v_seq)
        INTO v_next;
    v_current := v_next / c_width;
    -- The current partition (missing only if someone dropped it: writes
    -- fail until it is back) and the next (nothing to do when they are
    -- there).
    BEGIN
        PERFORM pipeline._add_partitions(v_current);
        PERFORM pipeline._add_partitions(v_current + 1);
    EXCEPTION WHEN lock_not_available THEN
        -- Attaching waits for a VACUUM or ANALYZE of the partitioned
        -- table by hand, for one: made at the next purge.
        RETURN 0;
    END;
    -- The floor of the claims (pipeline.settled_below) may rise, and the
    -- sequence move, only while no replay is under way (pipeline._unsettle
    -- holds this lock shared until it commits), and in a transaction whose
    -- every statement sees what committed before it.
    v_free := current_setting('transaction_isolation') = 'read committed'
              AND pg_try_advisory_xact_lock('marketing.pipeline_events'::regclass::oid::integer, 16);
    IF v_free
       AND pipeline._committed(format('marketing.%I', 'pipeline_events_' || (v_current + 1))::regclass)
       AND pipeline._committed(format('marketing.%I', 'pipeline_delivery_attempts_' || (v_current + 1))::regclass) THEN
        -- The next one was made by a committed transaction: the sequence
        -- may move into it once the current one has held events for a span,
        -- or is half full.
        SELECT e.created_at INTO v_first
        FROM marketing.pipeline_events e
        WHERE e.id >= v_current * c_width AND e.id < (v_current + 1) * c_width
        ORDER BY e.id
        LIMIT 1;
        IF v_first < now() - v_span OR v_next >= v_current * c_width + c_width / 2 THEN
            PERFORM setval(v_seq, (v_current + 1) * c_width, false);
            v_current := v_current + 1;
            v_moved := true;
            PERFORM pipeline._add_partitions(v_current + 1);
        END IF;
    END IF;
    IF v_free THEN
        -- The floor: the start of the oldest partition with an event
        -- waiting (from scratch, so an event set back by hand is found
        -- too), at most the start of the current one; of the one before
        -- while a transaction older than the move into the current one runs
        -- (it may yet add events there).
        v_floor := CASE WHEN NOT v_moved
                             AND coalesce((SELECT s.moved_xid < pg_snapshot_xmin(pg_current_snapshot())
                                           FROM pipeline.settled_below s), true)
                        THEN v_current ELSE v_current - 1 END * c_width;
        FOR v_part IN
            SELECT p.events, p.k FROM pipeline._event_partitions() p WHERE p.k * c_width < v_floor ORDER BY p.k
        LOOP
            EXECUTE format('SELECT EXISTS (SELECT FROM %s e WHERE e.status IN (''pending'', ''failed'', ''processing''))',
                           v_part.events)
                INTO v_open;
            IF v_open THEN
                v_floor := v_part.k * c_width;
                EXIT;
            END IF;
        END LOOP;
        UPDATE pipeline.settled_below s
        SET id = greatest(v_floor, 0),
            moved_xid = CASE WHEN v_moved THEN pg_current_xact_id() ELSE s.moved_xid END
        WHERE s.id IS DISTINCT FROM greatest(v_floor, 0) OR v_moved;
    END IF;

    v_bound := v_current * c_width;
    IF older_than IS NULL OR older_than <= interval '0' THEN
        RETURN v_bound;  -- retention 0 keeps everything
    END IF;
    FOR v_part IN
        SELECT p.events, p.k FROM pipeline._event_partitions() p WHERE p.k < v_current ORDER BY p.k
    LOOP
        -- From the partition's own indexes (newest event, last delivery,
        -- any event waiting or dead).
        EXECUTE format($q$SELECT (SELECT max(e.created_at) FROM %1$s e),
                                 (SELECT max(e.processed_at) FROM %1$s e WHERE e.status = 'processed'),
                                 EXISTS (SELECT FROM %1$s e WHERE e.status IN ('pending', 'failed', 'processing'))
                                 OR EXISTS (SELECT FROM %1$s e WHERE e.status = 'dead')$q$, v_part.events)
            INTO v_newest, v_delivered, v_open;
        IF v_newest >= now() - older_than OR v_delivered >= now() - older_than THEN
            -- Not all old yet, nor any partition after it.
            v_bound := v_part.k * c_width;
            EXIT;
        END IF;
        CONTINUE WHEN v_open;  -- kept; its delivered rows go by rows
        v_attempts := to_regclass(format('marketing.%I', 'pipeline_delivery_attempts_' || v_part.k));
        BEGIN
            FOREACH v_table IN ARRAY array_remove(ARRAY[v_part.events, v_attempts], NULL) LOOP
                -- The first partitions belong to the extension (made by
                -- CREATE EXTENSION): it lets go of them first.
                IF EXISTS (SELECT FROM pg_depend d
                           WHERE d.classid = 'pg_class'::regclass AND d.objid = v_table
                             AND d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e') THEN
                    EXECUTE format('ALTER EXTENSION pipeline_ext DROP TABLE %s', v_table);
                END IF;
                EXECUTE format('DROP TABLE %s', v_table);
            END LOOP;
        EXCEPTION
            WHEN lock_not_available THEN
                -- Busy now: tried again at the next purge, and no rows of it
                -- or later ones are deleted meanwhile.
                v_bound := v_part.k * c_width;
                EXIT;
            WHEN dependent_objects_still_exist THEN
                -- Someone's view (say) reads the partition itself: it stays,
                -- and its old delivered rows go by rows.
                RAISE WARNING 'pipeline.purge: partition % of the events is kept: %', v_part.events, SQLERRM
                    USING HINT = 'Objects that use a partition of marketing.pipeline_events or '
                                 'marketing.pipeline_delivery_attempts keep it from being dropped: use the '
                                 'partitioned tables instead.';
        END;
    END LOOP;
    RETURN v_bound;
END
$$;
REVOKE ALL ON FUNCTION pipeline._maintain_partitions(interval) FROM PUBLIC;
COMMENT ON FUNCTION pipeline._maintain_partitions(interval) IS
    'Makes the next partition of the event history, moves the id sequence into it once the current one has held a span '
    '(a quarter of pipeline.retention, at least an hour) or is half full, and drops the partitions delivered longer than '
    'older_than ago (pipeline.purge calls it).';

-- Deleting old history (the deliverers call it every tenth of the
-- retention, again while it returns max_rows or more): first the
-- partitions above; then, in small batches, delivered events older than
-- older_than in the partitions kept for an event that waits or is dead
-- (their attempts go with them) and attempts older than it there. Failed
-- and dead events stay until someone replays or deletes them. Before that,
-- events of types recorded without delivery are settled as processed.
CREATE FUNCTION pipeline.purge(older_than interval DEFAULT NULL, max_rows integer DEFAULT 1000)
RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
    SET enable_seqscan = off SET enable_bitmapscan = off SET jit = off
    SET enable_hashjoin = off SET enable_mergejoin = off
    SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_age     interval := coalesce(older_than, pipeline._setting('retention', '7d')::interval);
    v_below   bigint;
    v_settled bigint;
    v_events  bigint;
    v_attempts bigint;
BEGIN
    IF max_rows IS NULL OR max_rows < 1 THEN
        RAISE EXCEPTION 'pipeline.purge: max_rows must be at least 1' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Partitions (only the deliverers' roles and the owner may make and drop
    -- them; for another caller, rows are deleted wherever they are old).
    IF has_function_privilege('pipeline._maintain_partitions(interval)', 'EXECUTE') THEN
        v_below := pipeline._maintain_partitions(v_age);
    END IF;
    -- Events of the types recorded without delivery (pipeline.undelivered_types)
    -- end as processed, at their creation: no deliverer waits for them.
    UPDATE marketing.pipeline_events e
    SET status = 'processed', processed_at = e.created_at, claimed_by = NULL
    WHERE e.id = ANY (ARRAY(
        SELECT o.id FROM pipeline.undelivered_types u
        -- NB: not while it has an endpoint (a restore may bring both back).
        CROSS JOIN LATERAL (SELECT o.id FROM marketing.pipeline_events o
                            WHERE o.event_type = u.event_type AND o.status IN ('pending', 'failed')
                            LIMIT max_rows FOR UPDATE SKIP LOCKED) o
        WHERE NOT EXISTS (SELECT 1 FROM pipeline.webhooks w WHERE w.event_type = u.event_type)
        LIMIT max_rows));
    GET DIAGNOSTICS v_settled = ROW_COUNT;
    IF v_age <= interval '0' THEN
        RETURN v_settled;  -- retention 0 keeps everything
    END IF;
    v_below := coalesce(v_below, 9223372036854775807);
    DELETE FROM marketing.pipeline_events e
    WHERE e.id = ANY (ARRAY(
        SELECT o.id FROM marketing.pipeline_events o
        WHERE o.status = 'processed' AND o.processed_at < now() - v_age AND o.id < v_below
        ORDER BY o.processed_at
        LIMIT max_rows
        FOR UPDATE SKIP LOCKED));
    GET DIAGNOSTICS v_events = ROW_COUNT;
    WITH old AS (
        SELECT a.event_id, a.id FROM marketing.pipeline_delivery_attempts a
        WHERE a.created_at < now() - v_age AND a.event_id < v_below
        ORDER BY a.created_at
        LIMIT max_rows
    )
    DELETE FROM marketing.pipeline_delivery_attempts a USING old
    WHERE a.event_id = old.event_id AND a.id = old.id;
    GET DIAGNOSTICS v_attempts = ROW_COUNT;
    DELETE FROM pipeline.deliverers d WHERE d.last_active_at < now() - v_age;
    RETURN v_settled + v_events + v_attempts;
END
$$;
COMMENT ON FUNCTION pipeline.purge(interval, integer) IS
    'Makes the next partition of the event history and drops those delivered longer than older_than (default '
    'pipeline.retention) ago; settles up to max_rows events of pipeline.undelivered_types as processed, deletes up to '
    'max_rows delivered events older than older_than from partitions kept for waiting or dead events and up to max_rows '
    'old delivery attempts there; returns how many rows it settled or deleted. Retention 0 keeps everything.';

-- The first partition, and the next one ahead.
SELECT pipeline._add_partitions(0);
SELECT pipeline._add_partitions(1);

-- 006_queue.sql: queue operations for whoever delivers events.
--
-- A consumer claims a batch (the events become processing, with a lease),
-- commits, delivers them, and reports each outcome with mark_delivered or
-- mark_failed. If it dies instead, the lease runs out and the events are
-- claimed again: delivery is at least once, so receivers should treat the
-- event id as an idempotency key.
--
-- Settings (read with current_setting, so they work without the library too;
-- set them with ALTER DATABASE ... SET or ALTER SYSTEM SET):
--   pipeline.max_attempts  attempts before an event is dead        (default 10)
--   pipeline.backoff_base  delay after the first failed attempt    (default 5s)
--   pipeline.backoff_cap   longest delay between attempts          (default 1h)
--   pipeline.lease_time    lease of a claimed event                 (default 30s, at most 1 day)
--   pipeline.disable_after an endpoint failing every request this long is given up (default 3d; 0 never)
--
-- Consumers need exactly these rights (the worker's role has them): SELECT
-- on marketing.pipeline_events and UPDATE of its delivery columns only, so
-- that no consumer can change what an event says or where it goes:
--   GRANT SELECT, UPDATE (status, attempts, next_attempt_at, processed_at, last_error, replay_count, claimed_by)
--       ON marketing.pipeline_events TO consumer;
--   GRANT SELECT, INSERT, UPDATE (resolved, resolved_at, resolution_note)
--       ON marketing.pipeline_error_log TO consumer;    -- failures; resolved once delivered
--
-- Plans: the functions a deliverer calls (here and in 013_delivery.sql) are
-- written for the indexes of 003_events.sql and must not depend on the
-- table's statistics, which are usually stale (analyzed when everything was
-- delivered, or never), nor on the values of the call: after five calls a
-- session may switch to a generic plan, made for any values (a LIMIT of
-- unknown size counts as a tenth of the table). They look events up by
-- primary key, read the due index in its order, and run with enable_seqscan,
-- enable_bitmapscan, enable_hashjoin and enable_mergejoin off (SET clauses),
-- so that a guess that most rows match cannot make one read the whole
-- table. tests/plans.rs checks the plans in each state, generic plans too.
-- And they always take the generic plan (plan_cache_mode): with the
-- settings above a generic plan's estimate holds a disabled node's 10^10,
-- so PostgreSQL kept planning every statement afresh for the values of
-- each call, a quarter of a deliverer's CPU time.
-- They also run with jit off: a plan node the settings disable but that has
-- no alternative (a sequential scan of pipeline.deliverers) costs 10^10,
-- far above jit_above_cost, and PostgreSQL then compiled that statement
-- with LLVM at every execution: tens of milliseconds each time, and about
-- 25 MB that LLVM kept in the deliverer's process.

-- NB: inlined where it is called, so it has no SET clause and qualifies
-- every name and operator instead (no NULLIF either: it looks up = by
-- search_path). With the clause, each call was a SQL function parsed and
-- planned anew, several times in every claim and recording.
CREATE FUNCTION pipeline._setting(name text, fallback text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN pg_catalog.current_setting('pipeline.' OPERATOR(pg_catalog.||) name, true)
                     OPERATOR(pg_catalog.<>) ''
                THEN pg_catalog.current_setting('pipeline.' OPERATOR(pg_catalog.||) name, true)
                ELSE fallback END
$$;

-- The floor of the claims: every event with a lower id is settled
-- (processed or dead), so the deliverers' statements look no lower, and
-- PostgreSQL leaves the partitions below it (the delivered history) out
-- when each statement starts (with the seven partitions of a 30-day
-- retention, an event's claim and settling took 0.76 - 0.85 ms against
-- 0.61 - 0.66 with two: docs/benchmark-notes.md, "Sixth pass"). _maintain_partitions
-- (015_partitions.sql) sets it at each purge; a replay lowers it first
-- (_unsettle). An event set back to pending by hand below it, rather than
-- by pipeline.replay, is claimed after the next purge.
--   id         the floor
--   moved_xid  the transaction that last moved the id sequence into a new
--              partition: until every transaction older than it has ended,
--              one of them may still add an event to the partition before,
--              and the floor stays there
CREATE TABLE pipeline.settled_below (
    one       boolean PRIMARY KEY DEFAULT true CONSTRAINT one_row CHECK (one),
    id        bigint NOT NULL DEFAULT 0,
    moved_xid xid8
);
INSERT INTO pipeline.settled_below DEFAULT VALUES;
GRANT SELECT ON pipeline.settled_below TO PUBLIC;
COMMENT ON TABLE pipeline.settled_below IS
    'Every event with an id below this one is settled (processed or dead): claims look no lower. '
    'Set by the purge, lowered by replays.';

-- The floor as the deliverers' statements read it (0 if its row is gone).
-- NB: no SET clause, so that it is inlined where it is called; its one
-- name is qualified instead (as in _setting).
CREATE FUNCTION pipeline._settled_below() RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT s.id FROM pipeline.settled_below s), 0)
$$;

-- Lowers the floor of the claims to event_id, before a replay sets events
-- back. NB: SECURITY DEFINER, so that whoever may replay need not write
-- the floor; it can only lower it (claims then read more partitions, as
-- before there was a floor). The shared lock tells _maintain_partitions
-- that a replay is under way until it commits: the floor rises only while
-- none is, so never above events set back that it cannot see yet. Only a
-- replay that lowers the floor writes the row (and waits for another one
-- that did, until it commits).
CREATE FUNCTION pipeline._unsettle(event_id bigint) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared('marketing.pipeline_events'::regclass::oid::integer, 16);
    UPDATE pipeline.settled_below s SET id = _unsettle.event_id WHERE s.id > _unsettle.event_id;
END
$$;

-- Back to pending, due now, with a fresh set of attempts. With force, events
-- still processing too (their consumer is gone): those keep their attempt
-- count, so that a late outcome of the old claim cannot settle the new one.
-- A listening deliverer (pipeline-relay) hears of it on pipeline_wake (see
-- 011_webhooks.sql).
-- NB: plpgsql, so that its statement is planned once per session (with
-- the history's partitions, planning was most of a replay), and reads
-- only the partitions of the ids given.
CREATE FUNCTION pipeline._requeue(event_ids bigint[], force boolean DEFAULT false) RETURNS SETOF bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_lo bigint;
    v_hi bigint;
BEGIN
    PERFORM pg_notify('pipeline_wake', 'replay');
    SELECT min(r.id), max(r.id) INTO v_lo, v_hi FROM unnest(_requeue.event_ids) AS r(id);
    -- Claims look from the lowest of them again.
    PERFORM pipeline._unsettle(v_lo);
    RETURN QUERY
    UPDATE marketing.pipeline_events e
    SET status = 'pending',
        next_attempt_at = now(),
        attempts = CASE WHEN e.status = 'processing' THEN e.attempts ELSE 0 END,
        processed_at = NULL,
        replay_count = e.replay_count + 1,
        claimed_by = NULL
    WHERE e.id = ANY (_requeue.event_ids) AND e.id BETWEEN v_lo AND v_hi
      AND (e.status <> 'processing' OR _requeue.force)
    RETURNING e.id;
END
$$;

-- Raises a clear error naming the ids that do not exist.
CREATE FUNCTION pipeline._require_events(event_ids bigint[]) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_missing bigint[];
    v_lo      bigint;
    v_hi      bigint;
BEGIN
    IF event_ids IS NULL OR array_position(event_ids, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'event ids must not be NULL'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    -- (only the partitions of the ids given are read)
    SELECT min(want.id), max(want.id) INTO v_lo, v_hi FROM unnest(event_ids) AS want(id);
    SELECT array_agg(DISTINCT want.id ORDER BY want.id) INTO v_missing
    FROM unnest(event_ids) AS want(id)
    WHERE NOT EXISTS (SELECT 1 FROM marketing.pipeline_events e WHERE e.id = want.id AND e.id BETWEEN v_lo AND v_hi);
    IF v_missing IS NOT NULL THEN
        RAISE EXCEPTION 'no event with id %', array_to_string(v_missing[1:20], ', ')
                        || CASE WHEN cardinality(v_missing) > 20 THEN ' (and more)' ELSE '' END
            USING ERRCODE = 'no_data_found';
    END IF;
END
$$;

-- Delay before the next attempt after a failed attempt number `attempt`:
-- exponential from backoff_base, capped at backoff_cap, with 50-100% jitter so
-- that events failing together do not come back together.
CREATE FUNCTION pipeline.backoff(attempt integer) RETURNS interval
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
    SELECT least(pipeline._setting('backoff_cap', '1h')::interval,
                 pipeline._setting('backoff_base', '5s')::interval
                     * power(2, least(greatest(coalesce(attempt, 1), 1) - 1, 30)))
           * (0.5 + random() / 2)
$$;
COMMENT ON FUNCTION pipeline.backoff(integer) IS
    'Delay before retrying after failed attempt n: backoff_base * 2^(n-1), at most backoff_cap, times a random 0.5-1.';

-- Claiming due events: they become processing until the lease ends. The
-- claim itself, for pipeline.claim and the deliverers' _claim_deliveries:
-- the claimed rows as the claim left them (status processing, attempts
-- counted). For the deliverers, two more:
--   max_bytes  the events are taken in id order until their payloads reach
--              this (the first always comes); those after it are left due
--   leases     a lease per type of event_types (NULL: lease), for endpoints
--              whose requests may outlast the lease
CREATE FUNCTION pipeline._claim_rows(
    batch_size  integer,
    lease       interval,
    event_types text[],
    consumer    text,
    max_bytes   bigint DEFAULT NULL,
    leases      interval[] DEFAULT NULL
) RETURNS SETOF marketing.pipeline_events
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
    SET enable_seqscan = off SET enable_bitmapscan = off SET jit = off
    SET enable_hashjoin = off SET enable_mergejoin = off
    SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_lease  interval := coalesce(lease, pipeline._setting('lease_time', '30s')::interval);
    v_types  text[] := _claim_rows.event_types;
    v_quotas integer[];
    v_from   bigint;
BEGIN
    IF batch_size IS NULL OR batch_size NOT BETWEEN 1 AND 10000 THEN
        RAISE EXCEPTION 'pipeline.claim: batch_size must be between 1 and 10000, not %', coalesce(batch_size::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF v_lease <= interval '0' OR v_lease > interval '1 day' THEN
        RAISE EXCEPTION 'pipeline.claim: lease must be positive and at most 1 day, not %', v_lease
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'A consumer that dies leaves its events processing until the lease ends.';
    END IF;
    -- Every event below it is settled: each statement reads only the
    -- partitions from there on (a variable: PostgreSQL leaves the others
    -- out when the statement starts).
    v_from := pipeline._settled_below();
    IF v_types IS NULL THEN
        -- The types with open events, from the due index, skipping from one
        -- type to the next (a loose index scan) instead of reading every row.
        v_types := ARRAY(
            WITH RECURSIVE open_types (event_type) AS (
                SELECT min(e.event_type::text)
                FROM marketing.pipeline_events e
                WHERE e.status IN ('pending', 'failed', 'processing') AND e.id >= v_from
                UNION ALL
                SELECT (SELECT min(e.event_type::text)
                        FROM marketing.pipeline_events e
                        WHERE e.status IN ('pending', 'failed', 'processing') AND e.event_type > o.event_type
                          AND e.id >= v_from)
                FROM open_types o
                WHERE o.event_type IS NOT NULL
            )
            SELECT o.event_type FROM open_types o WHERE o.event_type IS NOT NULL);
    END IF;
    IF cardinality(v_types) = 1 THEN
        v_quotas := ARRAY[batch_size];
    ELSIF cardinality(v_types) > 1 THEN
        -- Each type's share of the batch: how many of the oldest due events
        -- over all types are its own, read without locking. Locking each
        -- type's first batch_size events instead (to keep the oldest of
        -- them) locked up to batch_size rows per type to claim batch_size.
        SELECT array_agg(p.event_type), array_agg(p.quota) INTO v_types, v_quotas
        FROM (SELECT c.event_type, count(*)::integer AS quota
              FROM (SELECT types.event_type
                    FROM unnest(v_types) AS types(event_type)
                    CROSS JOIN LATERAL (
                        SELECT e.id, e.next_attempt_at
                        FROM marketing.pipeline_events e
                        WHERE e.event_type = types.event_type
                          AND e.status IN ('pending', 'failed', 'processing')
                          AND e.next_attempt_at <= now()
                          AND e.id >= v_from
                        ORDER BY e.next_attempt_at, e.id
                        LIMIT batch_size
                    ) c
                    ORDER BY c.next_attempt_at, c.id
                    LIMIT batch_size) c
              GROUP BY c.event_type) p;
    END IF;
    -- Each type's share, oldest due first, skipping rows that another
    -- consumer holds (it then takes the next ones of that type). Over
    -- max_bytes, the rest stay due (locked by this transaction until it
    -- ends, which a deliverer's does at once).
    -- NB: the rows come back as the update left them: read again by id in
    -- the caller's statement, they would be as its snapshot saw them, before
    -- the claim.
    RETURN QUERY
    WITH candidates AS (
        SELECT c.id, c.event_type, c.stored
        FROM unnest(v_types, v_quotas) AS q(event_type, quota)
        CROSS JOIN LATERAL (
            SELECT e.id, e.event_type::text AS event_type,
                   CASE WHEN max_bytes IS NOT NULL THEN pipeline._payload_bytes(e.payload) END AS stored
            FROM marketing.pipeline_events e
            WHERE e.event_type = q.event_type
              AND e.status IN ('pending', 'failed', 'processing')
              AND e.next_attempt_at <= now()
              AND e.id >= v_from
            ORDER BY e.next_attempt_at, e.id
            LIMIT q.quota
            FOR UPDATE SKIP LOCKED
        ) c
        WHERE q.quota > 0
    ), kept AS (
        SELECT k.id, k.event_type
        FROM (SELECT c.id, c.event_type,
                     max_bytes IS NULL OR row_number() OVER w = 1 OR sum(c.stored) OVER w <= max_bytes AS keep
              FROM candidates c
              WINDOW w AS (ORDER BY c.id)) k
        WHERE k.keep
    )
    UPDATE marketing.pipeline_events e
    SET status = 'processing',
        attempts = e.attempts + 1,
        next_attempt_at = now() + coalesce((SELECT l.lease FROM unnest(_claim_rows.event_types, leases) AS l(event_type, lease)
                                            WHERE l.event_type = k.event_type), v_lease),
        claimed_by = consumer
    FROM kept k
    WHERE e.id = k.id AND e.id >= v_from
    RETURNING e.*;
END
$$;
CREATE FUNCTION pipeline.claim(
    batch_size  integer DEFAULT 100,
    lease       interval DEFAULT NULL,
    event_types text[] DEFAULT NULL,
    consumer    text DEFAULT NULL
) RETURNS SETOF marketing.pipeline_events
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
    SET enable_seqscan = off SET enable_bitmapscan = off SET jit = off
    SET enable_hashjoin = off SET enable_mergejoin = off
    SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    RETURN QUERY SELECT * FROM pipeline._claim_rows(batch_size, lease, event_types, consumer);
END
$$;
COMMENT ON FUNCTION pipeline.claim(integer, interval, text[], text) IS
    'Claims up to batch_size due events (oldest due first, skipping rows other consumers hold): '
    'they become processing with attempts + 1 until the lease ends (at most 1 day), claimed_by consumer. '
    'Commit before delivering.';

-- A consumer that restarts after a crash takes back what it held: its
-- events are due again now instead of when their leases end. The attempt
-- counts stay (the crash may have come after a request went out).
CREATE FUNCTION pipeline.release_claims(consumer text) RETURNS integer
LANGUAGE sql SET search_path = pg_catalog, pg_temp
    SET enable_seqscan = off SET enable_bitmapscan = off SET jit = off
    SET enable_hashjoin = off SET enable_mergejoin = off
    SET plan_cache_mode = force_generic_plan AS $$
    WITH released AS (
        UPDATE marketing.pipeline_events e
        -- NB: due since their creation, so that they go before the backlog
        -- that came after them (they were claimed first).
        SET status = 'pending', next_attempt_at = least(e.created_at, now()), claimed_by = NULL
        WHERE e.status = 'processing' AND e.claimed_by = release_claims.consumer
        RETURNING e.id
    )
    SELECT count(*)::integer FROM released
$$;
COMMENT ON FUNCTION pipeline.release_claims(text) IS
    'Makes the events a named consumer still holds due again now, ahead of events created after them (after its crash); returns how many.';

-- Settling claimed events: the one place where a delivery outcome changes an
-- event. Delivered events become processed; failed ones failed (due again at
-- retry_at, or after pipeline.backoff) or dead (attempts used up, or give_up),
-- and every failure goes to the error log. Only events still processing, and
-- (when attempt is given) still in that attempt, change: a consumer whose
-- lease ran out and whose event was claimed again cannot overwrite the newer
-- attempt. The arrays are parallel; missing trailing values count as NULL.
-- Errors logged for an event that is then delivered are resolved.
CREATE FUNCTION pipeline._settle(
    event_ids bigint[],
    attempts  integer[],
    delivered boolean[],
    errors    text[],
    retry_at  timestamptz[],
    give_up   boolean[],
    details   jsonb[]
) RETURNS TABLE (event_id bigint, status text)
-- NB: plpgsql, so that the statement is planned once per session, not on
-- every call as in a SQL function (a tenth of a deliverer's SQL time went
-- to planning it).
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
    SET enable_seqscan = off SET enable_bitmapscan = off SET jit = off
    SET enable_hashjoin = off SET enable_mergejoin = off
    SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
DECLARE
    v_lo bigint;
    v_hi bigint;
BEGIN
    -- The partitions the events are in, and no others, are read (a
    -- deliverer's events are usually all in the newest).
    SELECT min(o.id), max(o.id) INTO v_lo, v_hi FROM unnest(_settle.event_ids) AS o(id);
    -- NB: plans that hold whatever the statistics say. Each event is looked
    -- up by its primary key (OFFSET 0 keeps the status test out of that
    -- look-up), and the update compares with the values read, not with
    -- constants. Given 'processing' as a constant, the planner may read
    -- every processing event from the due index once per outcome whenever
    -- the statistics say there are none (the table was analyzed while
    -- everything was delivered): quadratic in the backlog. MATERIALIZED keeps
    -- the constant from reaching the update through the join.
    RETURN QUERY
    WITH outcome AS MATERIALIZED (
        SELECT o.*, e.status AS current_status, e.attempts AS current_attempts,
               CASE WHEN o.delivered THEN 'processed'
                    WHEN coalesce(o.give_up, false)
                      OR e.attempts >= pipeline._setting('max_attempts', '10')::integer THEN 'dead'
                    ELSE 'failed'
               END AS new_status
        FROM unnest(_settle.event_ids, _settle.attempts, _settle.delivered, _settle.errors, _settle.retry_at,
                    _settle.give_up, _settle.details)
                 AS o(event_id, attempt, delivered, error, retry_at, give_up, details)
        CROSS JOIN LATERAL (SELECT e.status, e.attempts FROM marketing.pipeline_events e
                            WHERE e.id = o.event_id AND e.id BETWEEN v_lo AND v_hi OFFSET 0) e
        WHERE e.status = 'processing' AND (o.attempt IS NULL OR e.attempts = o.attempt)
    ), settled AS (
        UPDATE marketing.pipeline_events e
        SET status = o.new_status,
            claimed_by = NULL,
            processed_at = CASE WHEN o.new_status = 'processed' THEN now() END,
            next_attempt_at = CASE WHEN o.new_status = 'failed'
                                   THEN coalesce(o.retry_at, now() + pipeline.backoff(o.current_attempts))
                                   ELSE e.next_attempt_at END,
            last_error = CASE WHEN o.new_status = 'processed' THEN e.last_error ELSE o.error END
        FROM outcome o
        -- Still as read: a concurrent settle of the same attempt wins.
        WHERE e.id = o.event_id AND e.status = o.current_status AND e.attempts = o.current_attempts
          AND e.id BETWEEN v_lo AND v_hi
        RETURNING e.id, e.event_type, e.status, e.attempts, o.error, o.details
    ), logged AS (
        INSERT INTO marketing.pipeline_error_log (stage, event_id, error_message, details)
        SELECT s.event_type, s.id, coalesce(s.error, 'delivery failed'),
               coalesce(s.details, '{}') || jsonb_build_object('attempt', s.attempts, 'status', s.status)
        FROM settled s
        WHERE s.status <> 'processed'
    ), resolved AS (
        -- An event delivered in the end leaves no error to act on.
        UPDATE marketing.pipeline_error_log l
        SET resolved = true, resolved_at = now(),
            resolution_note = format('event delivered on attempt %s', s.attempts)
        FROM settled s
        WHERE s.status = 'processed' AND l.event_id = s.id AND NOT l.resolved
    )
    SELECT s.id, s.status::text FROM settled s;
END
$$;

-- Recording a successful delivery.
CREATE FUNCTION pipeline.mark_delivered(event_id bigint) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pipeline._require_events(ARRAY[event_id]);
    RETURN EXISTS (SELECT 1 FROM pipeline._settle(ARRAY[event_id], NULL, ARRAY[true], NULL, NULL, NULL, NULL));
END
$$;
COMMENT ON FUNCTION pipeline.mark_delivered(bigint) IS
    'Marks a claimed event processed. False (and no change) when it was not processing, e.g. already delivered.';

CREATE FUNCTION pipeline.mark_delivered_many(event_ids bigint[]) RETURNS SETOF bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pipeline._require_events(event_ids);
    RETURN QUERY
    SELECT s.event_id
    FROM pipeline._settle(event_ids, NULL, array_fill(true, ARRAY[cardinality(event_ids)]),
                          NULL, NULL, NULL, NULL) s;
END
$$;
COMMENT ON FUNCTION pipeline.mark_delivered_many(bigint[]) IS
    'Marks claimed events processed; returns the ids that changed.';

-- Recording a failed delivery: retried later, or dead when out of attempts.
CREATE FUNCTION pipeline.mark_failed(
    event_id bigint,
    error    text,
    retry_at timestamptz DEFAULT NULL,
    details  jsonb DEFAULT NULL,
    retry    boolean DEFAULT true
) RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF error IS NULL OR pipeline._is_blank(error) THEN
        RAISE EXCEPTION 'pipeline.mark_failed: error must describe the failure'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM pipeline._require_events(ARRAY[event_id]);
    RETURN (SELECT s.status
            FROM pipeline._settle(ARRAY[event_id], NULL, ARRAY[false], ARRAY[error], ARRAY[retry_at],
                                  ARRAY[NOT coalesce(retry, true)], ARRAY[details]) s);
END
$$;
COMMENT ON FUNCTION pipeline.mark_failed(bigint, text, timestamptz, jsonb, boolean) IS
    'Records a failed delivery of a claimed event and logs the error. Returns failed (retried at retry_at, '
    'or after pipeline.backoff) or dead (out of attempts, or retry => false); NULL if the event was not processing.';

-- Putting events back to pending for immediate delivery. The attempt count
-- restarts (so the event gets a full set of retries); errors already logged stay.
CREATE FUNCTION pipeline.replay_many(event_ids bigint[], force boolean DEFAULT false) RETURNS SETOF bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_busy bigint[];
    v_lo   bigint;
    v_hi   bigint;
BEGIN
    PERFORM pipeline._require_events(event_ids);
    SELECT min(r.id), max(r.id) INTO v_lo, v_hi FROM unnest(event_ids) AS r(id);
    SELECT array_agg(e.id ORDER BY e.id) INTO v_busy
    FROM marketing.pipeline_events e
    WHERE e.id = ANY (event_ids) AND e.id BETWEEN v_lo AND v_hi AND e.status = 'processing';
    IF v_busy IS NOT NULL AND NOT coalesce(force, false) THEN
        RAISE EXCEPTION 'pipeline.replay: events % are being delivered right now', v_busy
            USING ERRCODE = 'object_in_use',
                  HINT = 'Wait for the delivery to finish or its lease to run out, then replay; '
                         'if the consumer holding them is gone, replay with force => true.';
    END IF;
    RETURN QUERY SELECT pipeline._requeue(event_ids, coalesce(force, false));
END
$$;
COMMENT ON FUNCTION pipeline.replay_many(bigint[], boolean) IS
    'Requeues the given events for immediate delivery; all or none. Events being delivered are refused '
    'unless force (their consumer is gone). Returns the ids requeued.';

CREATE FUNCTION pipeline.replay(event_id bigint, force boolean DEFAULT false) RETURNS bigint
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    SELECT pipeline.replay_many(ARRAY[event_id], force);
$$;
COMMENT ON FUNCTION pipeline.replay(bigint, boolean) IS
    'Requeues one event (failed, dead, processed or pending; processing too with force) for immediate delivery; returns its id.';

CREATE FUNCTION pipeline.replay_failed(
    event_type text DEFAULT NULL,
    since      timestamptz DEFAULT NULL,
    until      timestamptz DEFAULT NULL
) RETURNS SETOF bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF event_type IS NOT NULL THEN
        PERFORM pipeline._check_event_type(event_type);
    END IF;
    IF since > until THEN
        RAISE EXCEPTION 'pipeline.replay_failed: since (%) is after until (%)', since, until
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- NB: the failed events and the dead ones apart, each from its partial
    -- index (the due one holds the failed): a condition on both statuses
    -- matches neither index, and PostgreSQL read the whole table, delivered
    -- history included (1.4 s with 20 million delivered events).
    RETURN QUERY SELECT pipeline._requeue(array_agg(e.id))
    FROM (SELECT f.id FROM marketing.pipeline_events f
          WHERE f.status = 'failed'
            AND (replay_failed.event_type IS NULL OR f.event_type = replay_failed.event_type)
            AND (since IS NULL OR f.created_at >= since)
            AND (until IS NULL OR f.created_at < until)
          UNION ALL
          SELECT d.id FROM marketing.pipeline_events d
          WHERE d.status = 'dead'
            AND (replay_failed.event_type IS NULL OR d.event_type = replay_failed.event_type)
            AND (since IS NULL OR d.created_at >= since)
            AND (until IS NULL OR d.created_at < until)) e;
END
$$;
COMMENT ON FUNCTION pipeline.replay_failed(text, timestamptz, timestamptz) IS
    'Requeues every failed or dead event, optionally of one type and created in [since, until); returns the ids requeued.';

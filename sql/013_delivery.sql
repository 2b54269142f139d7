-- 013_delivery.sql: what the delivery worker reads and writes.
--
-- The worker (src/worker.rs) claims a batch with pipeline._claim_deliveries,
-- commits, sends the requests, then records every outcome with
-- pipeline._record_deliveries in a new transaction. Both are plain SQL, so an
-- outside consumer in trigger-only mode can use them too.

-- Partitioned like the events, by the same ranges of event_id: a day's
-- attempts go with the day's events (015_partitions.sql), and its indexes
-- are the partitions' own (see marketing.pipeline_events).
CREATE TABLE marketing.pipeline_delivery_attempts (
    id               bigint GENERATED ALWAYS AS IDENTITY,
    -- NB: no foreign key (see _delete_attempts below).
    event_id         bigint NOT NULL,
    attempt          integer NOT NULL,
    event_type       text NOT NULL,
    url              text NOT NULL,
    outcome          text NOT NULL,
    status_code      integer,
    duration_ms      integer NOT NULL,
    error            text,
    response_excerpt text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT outcome_known CHECK (outcome IN ('delivered', 'retry', 'failed', 'gone', 'rejected', 'refused'))
) PARTITION BY RANGE (event_id);
COMMENT ON TABLE marketing.pipeline_delivery_attempts IS
    'Every delivery attempt: endpoint, HTTP status (NULL when no response came), duration, and the error or the start of the response body.';
COMMENT ON COLUMN marketing.pipeline_delivery_attempts.outcome IS
    'delivered (2xx); retry (timeout, connection error, 429, 5xx); failed (other status); gone (410: endpoint disabled); '
    'rejected (402, 424: a service the receiver needs refuses it, a bad key or no credits; the event is dead); '
    'refused (never sent: larger than pipeline.max_event_size, or an address pipeline.blocked_networks denies; the event is dead).';

-- An event's attempts go with it: deleting events (pipeline.purge, or by
-- hand) deletes their attempts, and TRUNCATE ... CASCADE of the events
-- empties the attempt log too. This was a foreign key with ON DELETE
-- CASCADE; its check locked the event's row for every attempt logged (a
-- WAL record each): recording a delivery cost 38-43 us with it, 28-34
-- without (docs/benchmark-notes.md). The triggers run as the role that
-- deletes, which therefore needs DELETE (and SELECT) on the attempts as
-- well as on the events (TRUNCATE on them for a TRUNCATE of the events);
-- the worker's role and pipeline-relay's documented grants have them.
-- Attempts are logged only for events that exist when they are recorded
-- (_record_deliveries joins them); one recorded while another transaction
-- deletes its event stays until pipeline.purge removes it by age.
CREATE FUNCTION pipeline._delete_attempts() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
    SET enable_seqscan = off SET enable_bitmapscan = off SET jit = off
    SET enable_hashjoin = off SET enable_mergejoin = off
    SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        -- Ids may begin again (RESTART IDENTITY): claims look from the
        -- start again (015_partitions.sql).
        PERFORM pipeline._unsettle(0);
        BEGIN
            TRUNCATE marketing.pipeline_delivery_attempts;
        EXCEPTION WHEN object_in_use THEN
            -- The same TRUNCATE names the attempts too (they are empty
            -- already), or a cursor of this session reads them.
            DELETE FROM marketing.pipeline_delivery_attempts;
        END;
    ELSE
        DELETE FROM marketing.pipeline_delivery_attempts a
        WHERE a.event_id = ANY (ARRAY(SELECT o.id FROM deleted_events o));
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER delete_attempts AFTER DELETE ON marketing.pipeline_events
    REFERENCING OLD TABLE AS deleted_events
    FOR EACH STATEMENT EXECUTE FUNCTION pipeline._delete_attempts();
CREATE TRIGGER truncate_attempts AFTER TRUNCATE ON marketing.pipeline_events
    FOR EACH STATEMENT EXECUTE FUNCTION pipeline._delete_attempts();

-- The size of a payload in bytes without reading it: the stored size here
-- (compressed, so it can be much smaller), which is what a trigger-only
-- install has; the extension replaces it with a function of its library
-- that reads the uncompressed size from the value's header, so that a
-- large but compressible event is refused without being expanded.
-- NB: inlined into the claim, so it has no SET clause, and every name in it
-- is qualified instead: with the clause it was a function call with its own
-- search_path change per event, three times in each event's claim (about
-- 50,000 instructions per event, 13% of a claim and its recording, in
-- callgrind). STABLE, as pg_column_size is: an IMMUTABLE one is not inlined.
CREATE FUNCTION pipeline._payload_bytes(payload jsonb) RETURNS bigint
LANGUAGE sql STABLE STRICT AS $$
    SELECT pg_catalog.pg_column_size(payload)::pg_catalog.int8
$$;

-- Who delivers: the extension's worker ("pipeline_ext worker") and each
-- pipeline-relay (by its --name) leave their name here when a claim of
-- theirs takes events (at most once a second each), so pipeline.status()
-- tells which deliverer was last active. Rows of deliverers idle for longer
-- than pipeline.retention go with the purge.
CREATE TABLE pipeline.deliverers (
    name           text PRIMARY KEY,
    last_active_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT name_not_blank CHECK (pipeline._is_blank(name) IS FALSE)
);
COMMENT ON TABLE pipeline.deliverers IS
    'Deliverers (the extension''s worker, each pipeline-relay) and when a claim of theirs last took events.';

-- A batch of due events that have an enabled endpoint, claimed as by
-- pipeline.claim, each with its endpoint and the request body to send.
--   skip_types       types to leave alone (their endpoint is busy or probed)
--   only_types       claim only these types: a probe of an endpoint that is
--                    down, whose earliest waiting event is made due first
--                    (while it is down its events' attempts are counted,
--                    which pushes them out: the probe must not wait for them)
--   max_bytes        stop adding events once their size reaches this
--                    (the first event always comes); the rest go back
--   max_event_bytes  an event whose body is larger comes with body NULL and
--                    its size, and is refused without being sent
-- Bodies are built for the events kept only, so a claim never holds more
-- than about max_bytes of them (plus one event).
CREATE FUNCTION pipeline._claim_deliveries(
    batch_size      integer,
    lease           interval DEFAULT NULL,
    consumer        text DEFAULT NULL,
    skip_types      text[] DEFAULT NULL,
    only_types      text[] DEFAULT NULL,
    max_bytes       bigint DEFAULT NULL,
    max_event_bytes bigint DEFAULT NULL
)
RETURNS TABLE (
    event_id      bigint,
    attempt       integer,
    event_type    text,
    url           text,
    method        text,
    headers       text,
    secret        text,
    timeout_ms    integer,
    max_in_flight integer,
    body          text,
    body_bytes    bigint,
    confirm_header text
)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
    SET enable_seqscan = off SET enable_bitmapscan = off SET jit = off
    SET enable_hashjoin = off SET enable_mergejoin = off
    SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_types      text[];
    v_leases     interval[];
    v_lease      interval;
    v_timeout    text;
    v_default_ms integer;
    v_from       bigint;
BEGIN
    -- A request may outlast the lease (an endpoint whose timeout_ms is
    -- longer: a receiver that waits for a slow service): its events are held
    -- for the timeout and a lease more, or they could be claimed again, and
    -- sent twice, while the request is out.
    v_lease := coalesce(lease, pipeline._setting('lease_time', '30s')::interval);
    -- NB: the setting reads as '5s' where the extension defines it, and may
    -- be a bare number of milliseconds where it is only a placeholder.
    v_timeout := pipeline._setting('http_timeout', '5000');
    v_default_ms := CASE WHEN v_timeout ~ '^\s*[0-9]+\s*$' THEN v_timeout::integer
                         ELSE (extract(epoch FROM v_timeout::interval) * 1000)::integer END;
    -- NB: an endpoint without its credentials row (restored from a dump
    -- that leaves them out) is not claimed for: it would go out without its
    -- headers and signature. Its events wait for import_registry.
    SELECT array_agg(w.event_type::text),
           array_agg(CASE WHEN make_interval(secs => coalesce(w.timeout_ms, v_default_ms) / 1000.0) >= v_lease / 2
                          THEN v_lease + make_interval(secs => coalesce(w.timeout_ms, v_default_ms) / 1000.0)
                     END)
    INTO v_types, v_leases
    FROM pipeline.webhooks w
    JOIN pipeline.webhook_credentials c ON c.event_type = w.event_type
    WHERE w.enabled
      AND (skip_types IS NULL OR w.event_type::text <> ALL (skip_types))
      AND (only_types IS NULL OR w.event_type::text = ANY (only_types));
    IF v_types IS NULL THEN
        RETURN;
    END IF;
    IF only_types IS NOT NULL THEN
        v_from := pipeline._settled_below();  -- (as in _claim_rows)
        UPDATE marketing.pipeline_events e
        SET next_attempt_at = now()
        FROM unnest(v_types) AS t(event_type)
        CROSS JOIN LATERAL (
            SELECT o.id FROM marketing.pipeline_events o
            WHERE o.event_type = t.event_type AND o.status IN ('pending', 'failed') AND o.id >= v_from
            ORDER BY o.next_attempt_at, o.id
            LIMIT 1
        ) first
        WHERE e.id = first.id AND e.next_attempt_at > now() AND e.id >= v_from;
    END IF;
    -- One statement claims and builds the bodies (from the rows as the
    -- claim left them), in id order, until they reach max_bytes (the first
    -- always comes); the rest stay due.
    RETURN QUERY
    SELECT b.id, b.attempts, b.event_type::text, w.url, w.method, coalesce(c.headers, '{}')::text, c.secret,
           w.timeout_ms, w.max_in_flight,
           CASE WHEN max_event_bytes IS NULL OR octet_length(b.body) <= max_event_bytes THEN b.body END,
           coalesce(octet_length(b.body)::bigint, b.stored::bigint),
           w.confirm_header
    FROM (
        SELECT e.id, e.attempts, e.event_type, pipeline._payload_bytes(e.payload) AS stored,
               -- NB: byte for byte the text that
               -- jsonb_build_object('id', ..., 'data', e.payload)::text gave
               -- (keys in jsonb's order: shorter first, then bytewise; ", "
               -- and ": " between), but written out around payload::text:
               -- building that object decoded the payload into a second jsonb
               -- and encoded it again, about 5 us of each event's claim.
               -- src/tests/webhooks.rs compares the two on awkward values.
               CASE WHEN max_event_bytes IS NOT NULL AND pipeline._payload_bytes(e.payload) > max_event_bytes THEN NULL
                    -- NB: one concat(), not a chain of ||: each || copies
                    -- what it has so far, and with a 25 MB payload the worker
                    -- held eight copies of it (516 MB instead of 189 MB in
                    -- bin/bench's large-event scenario).
                    ELSE concat('{"id": ', e.id,
                                ', "data": ', e.payload::text,
                                ', "type": ', to_json(e.event_type::text)::text,
                                ', "source": {"op": ', coalesce(to_json(e.source_op::text)::text, 'null'),
                                ', "key": ', coalesce(e.source_key::text, 'null'),
                                ', "table": ', coalesce(to_json(e.source_table)::text, 'null'),
                                '}, "attempt": ', e.attempts,
                                ', "created_at": ', to_json(e.created_at)::text, '}')
               END AS body
        FROM pipeline._claim_rows(batch_size, v_lease, v_types, consumer, max_bytes, v_leases) e
        OFFSET 0  -- NB: a fence, so that each body is built once
    ) b
    JOIN pipeline.webhooks w ON w.event_type = b.event_type
    JOIN pipeline.webhook_credentials c ON c.event_type = b.event_type
    ORDER BY b.id;
    -- NB: looked at first: the upsert alone locks the row (a WAL record)
    -- even when it changes nothing, and this runs at every claim that
    -- takes events (FOUND: the query above returned rows).
    IF FOUND AND consumer IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM pipeline.deliverers d
                       WHERE d.name = consumer AND d.last_active_at >= now() - interval '1 second') THEN
        INSERT INTO pipeline.deliverers AS d (name, last_active_at) VALUES (consumer, now())
        ON CONFLICT (name) DO UPDATE SET last_active_at = excluded.last_active_at
        WHERE d.last_active_at < excluded.last_active_at - interval '1 second';
    END IF;
END
$$;

-- How each endpoint is doing, as its deliverers see it. _record_deliveries
-- keeps whether it answers: failing_since is the first failure after its
-- last answer (NULL while it answers; an answer is a delivery or a refusal
-- of one event, a failure is no answer, 429 or 5xx), last_failure what
-- that failure was (a status or the deliverer's own words, never a
-- receiver's). The deliverers report their circuit (delivery/src/health.rs:
-- closed; open while the endpoint is down and only probed; half_open while
-- it comes back) and any pause a Retry-After asked for, when it changes.
-- An endpoint that failed every request for pipeline.disable_after is
-- disabled, and its waiting events are dead (see _give_up_endpoint).
CREATE TABLE pipeline.endpoint_health (
    event_type      pipeline.event_type PRIMARY KEY
                    REFERENCES pipeline.webhooks (event_type) ON DELETE CASCADE ON UPDATE CASCADE,
    failing_since   timestamptz,
    last_answer_at  timestamptz,
    last_failure_at timestamptz,
    last_failure    text,
    circuit         text NOT NULL DEFAULT 'closed',
    circuit_since   timestamptz NOT NULL DEFAULT now(),
    circuit_reason  text,
    paused_until    timestamptz,
    reported_by     text,
    CONSTRAINT circuit_known CHECK (circuit IN ('closed', 'open', 'half_open'))
);
COMMENT ON TABLE pipeline.endpoint_health IS
    'Each endpoint as its deliverers see it: failing since when (NULL while it answers), its circuit '
    '(closed, open: down and only probed, half_open: coming back) and any Retry-After pause.';

-- A new URL, or an endpoint enabled again, starts with a clean slate: its
-- old failures would otherwise disable it again at its first failure.
-- NB: SECURITY DEFINER, so that whoever may change an endpoint need not
-- also be granted this table; it runs one DELETE by primary key.
CREATE FUNCTION pipeline._forget_endpoint_health() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    DELETE FROM pipeline.endpoint_health h WHERE h.event_type = NEW.event_type;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION pipeline._forget_endpoint_health() FROM PUBLIC;
CREATE TRIGGER forget_endpoint_health AFTER UPDATE OF url, enabled ON pipeline.webhooks
    FOR EACH ROW WHEN (OLD.url IS DISTINCT FROM NEW.url OR (NEW.enabled AND NOT OLD.enabled))
    EXECUTE FUNCTION pipeline._forget_endpoint_health();

-- A deliverer reports an endpoint's circuit (state closed, open, half_open)
-- or a pause (state paused, for paused_ms). half_open also makes the events
-- that failed meanwhile due now; returns how many.
CREATE FUNCTION pipeline._circuit_changed(
    event_type text, state text, reason text, paused_ms integer, consumer text
) RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
    SET enable_seqscan = off SET enable_bitmapscan = off SET jit = off
    SET enable_hashjoin = off SET enable_mergejoin = off
    SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    IF state = 'paused' THEN
        INSERT INTO pipeline.endpoint_health AS h (event_type, paused_until, reported_by)
        SELECT w.event_type, now() + make_interval(secs => paused_ms / 1000.0), consumer
        FROM pipeline.webhooks w WHERE w.event_type = _circuit_changed.event_type
        ON CONFLICT ON CONSTRAINT endpoint_health_pkey DO UPDATE
        SET paused_until = excluded.paused_until, reported_by = excluded.reported_by;
        RETURN 0;
    END IF;
    INSERT INTO pipeline.endpoint_health AS h (event_type, circuit, circuit_since, circuit_reason, reported_by)
    SELECT w.event_type, state, now(), reason, consumer
    FROM pipeline.webhooks w WHERE w.event_type = _circuit_changed.event_type
    ON CONFLICT ON CONSTRAINT endpoint_health_pkey DO UPDATE
    SET circuit = excluded.circuit, circuit_since = excluded.circuit_since,
        circuit_reason = excluded.circuit_reason, reported_by = excluded.reported_by;
    IF state = 'half_open' THEN
        RETURN pipeline._endpoint_recovered(event_type);
    END IF;
    RETURN 0;
END
$$;

-- While an endpoint is down (its circuit open) its events are not sent, but
-- their attempts are counted all the same as they come due, each failed
-- probe standing for them: an event ends as it would have without the
-- breaker (after pipeline.max_attempts, on pipeline.backoff's schedule),
-- without a request of its own. It is failed meanwhile (last_error says
-- why), and dead at the end with an error logged. Returns how many were
-- counted.
CREATE FUNCTION pipeline._count_while_down(event_type text, failure text) RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
    SET enable_seqscan = off SET enable_bitmapscan = off SET jit = off
    SET enable_hashjoin = off SET enable_mergejoin = off
    SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_max    integer := pipeline._setting('max_attempts', '10')::integer;
    v_error  text := format('not sent: the endpoint is down (the last failure: %s)', coalesce(failure, 'no answer'));
    v_count  integer;
BEGIN
    WITH due AS MATERIALIZED (
        SELECT e.id
        FROM marketing.pipeline_events e
        WHERE e.event_type = _count_while_down.event_type
          AND e.status IN ('pending', 'failed') AND e.next_attempt_at <= now()
        ORDER BY e.next_attempt_at, e.id
        FOR UPDATE SKIP LOCKED
    ), counted AS (
        UPDATE marketing.pipeline_events e
        SET attempts = e.attempts + 1,
            status = CASE WHEN e.attempts + 1 >= v_max THEN 'dead' ELSE 'failed' END,
            next_attempt_at = CASE WHEN e.attempts + 1 >= v_max THEN e.next_attempt_at
                                   ELSE now() + pipeline.backoff(e.attempts + 1) END,
            last_error = v_error,
            claimed_by = NULL
        FROM due d
        WHERE e.id = d.id
        RETURNING e.id, e.event_type, e.status, e.attempts
    ), logged AS (
        INSERT INTO marketing.pipeline_error_log (stage, event_id, error_message, details)
        SELECT c.event_type, c.id, v_error,
               jsonb_build_object('outcome', 'endpoint_down', 'attempt', c.attempts, 'status', c.status)
        FROM counted c
        WHERE c.status = 'dead'
    )
    SELECT count(*)::integer INTO v_count FROM counted;
    RETURN v_count;
END
$$;

-- Gives up on an endpoint that failed every request for
-- pipeline.disable_after: it is disabled with the reason, and its waiting
-- events (pending, failed) are dead with it, each with an error logged;
-- pipeline.enable_webhook and pipeline.replay_failed bring them back.
-- Events being delivered right now settle on their own.
CREATE FUNCTION pipeline._give_up_endpoint(event_type text, reason text) RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
    SET enable_seqscan = off SET enable_bitmapscan = off SET jit = off
    SET enable_hashjoin = off SET enable_mergejoin = off
    SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_ended integer;
BEGIN
    UPDATE pipeline.webhooks w
    SET enabled = false, disabled_reason = reason, updated_at = now()
    WHERE w.event_type = _give_up_endpoint.event_type AND w.enabled;
    WITH ended AS (
        UPDATE marketing.pipeline_events e
        SET status = 'dead', last_error = reason, claimed_by = NULL
        WHERE e.event_type = _give_up_endpoint.event_type AND e.status IN ('pending', 'failed')
        RETURNING e.id, e.event_type, e.attempts
    ), logged AS (
        INSERT INTO marketing.pipeline_error_log (stage, event_id, error_message, details)
        SELECT d.event_type, d.id, reason,
               jsonb_build_object('outcome', 'endpoint_disabled', 'attempt', d.attempts, 'status', 'dead')
        FROM ended d
        RETURNING 1
    )
    SELECT count(*)::integer INTO v_ended FROM logged;
    RETURN v_ended;
END
$$;

-- Recording a batch of delivery outcomes (parallel arrays, one entry per
-- attempt, in event id order): every attempt is logged, the events are
-- settled (a refused or rejected one is dead at once), a 410 Gone disables the
-- endpoint that answered it, each endpoint's health is kept, and an
-- endpoint that has failed every request for pipeline.disable_after is
-- given up (_give_up_endpoint).
CREATE FUNCTION pipeline._record_deliveries(
    event_ids      bigint[],
    attempts       integer[],
    outcomes       text[],
    status_codes   integer[],
    errors         text[],
    retry_after_ms integer[],
    durations_ms   integer[],
    excerpts       text[],
    urls           text[]
) RETURNS TABLE (event_id bigint, status text)
-- NB: plpgsql, so that its statements are planned once per session (a SQL
-- function is parsed and planned again on every call).
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
    SET enable_seqscan = off SET enable_bitmapscan = off SET jit = off
    SET enable_hashjoin = off SET enable_mergejoin = off
    SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_bound     interval;
    v_failed    record;
    v_delivered boolean[];
    v_errors    text[];
    v_retry_at  timestamptz[];
    v_give_up   boolean[];
    v_details   jsonb[];
    v_lo        bigint;
    v_hi        bigint;
BEGIN
    -- The partitions the events are in, and no others, are read.
    SELECT min(o.id), max(o.id) INTO v_lo, v_hi FROM unnest(_record_deliveries.event_ids) AS o(id);
    -- NB: only when some endpoint answered 410: an UPDATE of the endpoints,
    -- even of no row, announces them on pipeline_wake.
    IF 'gone' = ANY (_record_deliveries.outcomes) THEN
        UPDATE pipeline.webhooks w
        SET enabled = false,
            disabled_reason = format('410 Gone from %s at %s', o.url, now()),
            updated_at = now()
        FROM unnest(_record_deliveries.event_ids, _record_deliveries.outcomes, _record_deliveries.urls)
                 AS o(event_id, outcome, url)
        JOIN marketing.pipeline_events e ON e.id = o.event_id
        WHERE o.outcome = 'gone' AND w.event_type = e.event_type AND w.url = o.url AND w.enabled;
    END IF;
    -- Every attempt is logged, and from the rows logged, whether each
    -- endpoint of the batch answers (a delivery, or a refusal of one event)
    -- or failed every request of it (no answer, 429, 5xx): one statement,
    -- so that each event's type is looked up once. NB: an endpoint's row is
    -- written when that changes, and otherwise at most about once a second.
    WITH logged AS (
        INSERT INTO marketing.pipeline_delivery_attempts AS l
            (event_id, attempt, event_type, url, outcome, status_code, duration_ms, error, response_excerpt)
        SELECT o.event_id, o.attempt, e.event_type, o.url, o.outcome, o.status_code, o.duration_ms, o.error, o.excerpt
        FROM unnest(_record_deliveries.event_ids, _record_deliveries.attempts, _record_deliveries.outcomes,
                    _record_deliveries.status_codes, _record_deliveries.errors, _record_deliveries.durations_ms,
                    _record_deliveries.excerpts, _record_deliveries.urls)
                 AS o(event_id, attempt, outcome, status_code, error, duration_ms, excerpt, url)
        CROSS JOIN LATERAL (SELECT e.event_type FROM marketing.pipeline_events e
                            WHERE e.id = o.event_id AND e.id BETWEEN v_lo AND v_hi OFFSET 0) e
        RETURNING l.event_id, l.event_type, l.outcome, l.status_code, l.error
    ), batch AS (
        SELECT a.event_type,
               bool_or(a.outcome IN ('delivered', 'failed')) AS answered,
               bool_or(a.outcome IN ('retry', 'rejected')) AS failed,
               (array_agg(CASE WHEN a.status_code IS NOT NULL THEN 'HTTP ' || a.status_code ELSE a.error END
                          ORDER BY a.event_id DESC) FILTER (WHERE a.outcome IN ('retry', 'rejected')))[1] AS failure
        FROM logged a
        GROUP BY a.event_type
    )
    INSERT INTO pipeline.endpoint_health AS h (event_type, failing_since, last_answer_at, last_failure_at, last_failure)
    SELECT b.event_type, CASE WHEN NOT b.answered THEN now() END, CASE WHEN b.answered THEN now() END,
           CASE WHEN b.failed THEN now() END, b.failure
    FROM batch b
    WHERE (b.answered OR b.failed) AND EXISTS (SELECT 1 FROM pipeline.webhooks w WHERE w.event_type = b.event_type)
      -- NB: a row the update below would leave as it is is not offered to
      -- it: the upsert locks the row it finds (a WAL record) even when its
      -- WHERE then changes nothing, and this runs at every recording.
      AND NOT EXISTS (SELECT 1 FROM pipeline.endpoint_health h
                      WHERE h.event_type = b.event_type
                        AND b.answered = (h.failing_since IS NULL)
                        AND h.last_answer_at >= now() - interval '1 second'
                        AND NOT (b.failed AND (h.last_failure_at IS NULL
                                               OR h.last_failure_at < now() - interval '1 second')))
    ON CONFLICT ON CONSTRAINT endpoint_health_pkey DO UPDATE
    SET failing_since = CASE WHEN excluded.last_answer_at IS NOT NULL THEN NULL
                             ELSE coalesce(h.failing_since, now()) END,
        last_answer_at = coalesce(excluded.last_answer_at, h.last_answer_at),
        last_failure_at = coalesce(excluded.last_failure_at, h.last_failure_at),
        last_failure = coalesce(excluded.last_failure, h.last_failure)
    WHERE (excluded.last_answer_at IS NOT NULL) = (h.failing_since IS NOT NULL)
       OR h.last_answer_at IS NULL OR h.last_answer_at < now() - interval '1 second'
       OR (excluded.last_failure_at IS NOT NULL
           AND (h.last_failure_at IS NULL OR h.last_failure_at < now() - interval '1 second'));
    -- What settles each event; NB: when every attempt was delivered, only
    -- that (building the failures' arrays costs a fifth of a recording).
    IF _record_deliveries.outcomes <@ ARRAY['delivered'] THEN
        v_delivered := array_fill(true, ARRAY[cardinality(_record_deliveries.event_ids)]);
    ELSE
        v_delivered := ARRAY(SELECT o = 'delivered' FROM unnest(_record_deliveries.outcomes) o);
        v_errors := ARRAY(SELECT coalesce(o.error, 'HTTP ' || o.status_code)
                          FROM unnest(_record_deliveries.errors, _record_deliveries.status_codes) AS o(error, status_code));
        v_retry_at := ARRAY(SELECT now() + make_interval(secs => o / 1000.0)
                            FROM unnest(_record_deliveries.retry_after_ms) o);
        v_give_up := ARRAY(SELECT o IN ('refused', 'rejected') FROM unnest(_record_deliveries.outcomes) o);
        -- What the error log keeps of a failure (nothing for a delivery).
        v_details := ARRAY(SELECT CASE WHEN o.outcome <> 'delivered'
                                       THEN jsonb_strip_nulls(jsonb_build_object('url', o.url, 'status_code', o.status_code,
                                                                                 'outcome', o.outcome,
                                                                                 'response_excerpt', o.excerpt))
                                  END
                           FROM unnest(_record_deliveries.urls, _record_deliveries.status_codes, _record_deliveries.outcomes,
                                       _record_deliveries.excerpts) AS o(url, status_code, outcome, excerpt));
    END IF;
    RETURN QUERY
    SELECT s.event_id, s.status
    FROM pipeline._settle(_record_deliveries.event_ids, _record_deliveries.attempts,
                          v_delivered, v_errors, v_retry_at, v_give_up, v_details) s;
    -- NB: after the settling, so that the event a probe just settled is not
    -- counted twice, and is given up with the rest.
    IF 'retry' = ANY (_record_deliveries.outcomes) THEN
        PERFORM pipeline._count_while_down(h.event_type, h.last_failure)
        FROM pipeline.endpoint_health h
        WHERE h.circuit = 'open' AND h.failing_since IS NOT NULL;
    END IF;
    v_bound := pipeline._setting('disable_after', '3d')::interval;
    IF v_bound > interval '0' AND _record_deliveries.outcomes && ARRAY['retry', 'rejected'] THEN
        FOR v_failed IN
            SELECT h.event_type, h.failing_since, h.last_failure
            FROM pipeline.endpoint_health h
            JOIN pipeline.webhooks w ON w.event_type = h.event_type AND w.enabled
            WHERE h.failing_since < now() - v_bound
        LOOP
            PERFORM pipeline._give_up_endpoint(v_failed.event_type,
                format('given up: every request failed since %s (the last: %s), for longer than pipeline.disable_after (%s)',
                       v_failed.failing_since, coalesce(v_failed.last_failure, 'no answer'), v_bound));
        END LOOP;
    END IF;
END
$$;

-- (Retention, pipeline.purge: 015_partitions.sql.)

-- Per endpoint: state, backlog and the last hour of deliveries.
CREATE VIEW marketing.vw_endpoint_health AS
SELECT w.event_type,
       pipeline._url_seen(w.url) AS url,
       w.enabled,
       w.disabled_reason,
       (SELECT count(*) FROM marketing.pipeline_events e
        WHERE e.event_type = w.event_type AND e.status IN ('pending', 'failed', 'processing')) AS waiting,
       count(a.id) FILTER (WHERE a.outcome = 'delivered') AS delivered_1h,
       count(a.id) FILTER (WHERE a.outcome <> 'delivered') AS failed_1h,
       round(avg(a.duration_ms) FILTER (WHERE a.outcome = 'delivered'), 1) AS avg_ms_1h,
       max(a.created_at) AS last_attempt_at,
       (SELECT a2.status_code FROM marketing.pipeline_delivery_attempts a2
        WHERE a2.event_type = w.event_type AND a2.created_at > now() - interval '1 hour'
        ORDER BY a2.created_at DESC LIMIT 1) AS last_status_code,
       coalesce(h.circuit, 'closed') AS circuit,
       h.circuit_since,
       h.circuit_reason,
       CASE WHEN h.paused_until > now() THEN h.paused_until END AS paused_until,
       h.failing_since,
       h.last_failure,
       CASE WHEN w.enabled AND pipeline._setting('disable_after', '3d')::interval > interval '0'
            THEN h.failing_since + pipeline._setting('disable_after', '3d')::interval END AS give_up_at
FROM pipeline.webhooks w
LEFT JOIN pipeline.endpoint_health h ON h.event_type = w.event_type
LEFT JOIN marketing.pipeline_delivery_attempts a
       ON a.event_type = w.event_type AND a.created_at > now() - interval '1 hour'
GROUP BY w.event_type, w.url, w.enabled, w.disabled_reason, h.event_type
ORDER BY w.event_type;
COMMENT ON VIEW marketing.vw_endpoint_health IS
    'Each endpoint: enabled or why not, events waiting for it, its deliveries, failures and latency in the last hour, '
    'its circuit (closed; open: down and only probed; half_open: coming back) and any Retry-After pause, since when '
    'every request failed, and when it is given up (pipeline.disable_after) unless it answers.';

-- The delivery worker's pid when it runs in this database, else NULL. This
-- is what a trigger-only install has (no worker there); the extension
-- replaces it with a function of its library that asks shared memory, so
-- that it tells the truth to any role (pg_stat_activity hides the worker
-- from roles without pg_read_all_stats).
CREATE FUNCTION pipeline._worker_pid() RETURNS integer
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT NULL::integer
$$;

-- One row to see whether the pipeline is moving. Events of a type without
-- an enabled endpoint are not backlog: they wait for an endpoint, and are
-- counted apart (without_endpoint), unless the type is recorded without
-- delivery by design (pipeline.undelivered_types): those are no one's work.
-- stuck_work counts marketing.vw_stuck_work.
CREATE VIEW marketing.vw_pipeline_status AS
WITH open_events AS (
    SELECT e.status, e.created_at, w.event_type IS NOT NULL AS deliverable, u.event_type IS NOT NULL AS undelivered
    FROM marketing.pipeline_events e
    LEFT JOIN pipeline.webhooks w ON w.event_type = e.event_type AND w.enabled
    LEFT JOIN pipeline.undelivered_types u ON u.event_type = e.event_type
    WHERE e.status IN ('pending', 'processing', 'failed')
)
SELECT pipeline._worker_pid() IS NOT NULL AS worker_running,
       pipeline._worker_pid() AS worker_pid,
       count(*) FILTER (WHERE o.status = 'pending' AND o.deliverable) AS pending,
       count(*) FILTER (WHERE o.status = 'processing') AS processing,
       count(*) FILTER (WHERE o.status = 'failed' AND o.deliverable) AS failed,
       (SELECT count(*) FROM marketing.pipeline_events d WHERE d.status = 'dead') AS dead,
       now() - min(o.created_at) FILTER (WHERE o.status IN ('pending', 'failed') AND o.deliverable)
           AS oldest_pending_age,
       (SELECT count(*) FROM marketing.pipeline_delivery_attempts a
        WHERE a.created_at > now() - interval '1 minute' AND a.outcome = 'delivered') AS delivered_last_minute,
       (SELECT count(*) FROM marketing.pipeline_delivery_attempts a
        WHERE a.created_at > now() - interval '1 minute' AND a.outcome <> 'delivered') AS failed_last_minute,
       (SELECT count(*) FROM pipeline.webhooks w WHERE w.enabled) AS endpoints_enabled,
       (SELECT count(*) FROM pipeline.webhooks w WHERE NOT w.enabled) AS endpoints_disabled,
       (SELECT count(*) FROM marketing.pipeline_error_log l WHERE NOT l.resolved) AS unresolved_errors,
       count(*) FILTER (WHERE o.status IN ('pending', 'failed') AND NOT o.deliverable AND NOT o.undelivered)
           AS without_endpoint,
       (SELECT d.name FROM pipeline.deliverers d ORDER BY d.last_active_at DESC LIMIT 1) AS last_deliverer,
       (SELECT max(d.last_active_at) FROM pipeline.deliverers d) AS last_deliverer_active_at,
       (SELECT count(*) FROM pipeline.endpoint_health h
        JOIN pipeline.webhooks w ON w.event_type = h.event_type AND w.enabled
        WHERE h.failing_since IS NOT NULL) AS endpoints_failing,
       (SELECT min(h.failing_since) + pipeline._setting('disable_after', '3d')::interval
        FROM pipeline.endpoint_health h
        JOIN pipeline.webhooks w ON w.event_type = h.event_type AND w.enabled
        WHERE pipeline._setting('disable_after', '3d')::interval > interval '0') AS next_give_up_at,
       (SELECT count(*) FROM marketing.vw_stuck_work) AS stuck_work
FROM open_events o;
COMMENT ON VIEW marketing.vw_pipeline_status IS
    'What pipeline.status() returns: the worker, the backlog by status (events with an enabled endpoint), dead '
    'events, the last minute''s deliveries and failures, endpoints, unresolved errors, events waiting for an endpoint, '
    'which deliverer (the worker, a pipeline-relay) last claimed events, when, how many enabled endpoints fail '
    'every request, when the first of them is given up (pipeline.disable_after) unless it answers, and the '
    'companies and slots that are stuck (marketing.vw_stuck_work).';

CREATE FUNCTION pipeline.status()
RETURNS TABLE (
    worker_running         boolean,
    worker_pid             integer,
    pending                bigint,
    processing             bigint,
    failed                 bigint,
    dead                   bigint,
    oldest_pending_age     interval,
    delivered_last_minute  bigint,
    failed_last_minute     bigint,
    endpoints_enabled      bigint,
    endpoints_disabled     bigint,
    unresolved_errors      bigint,
    without_endpoint       bigint,
    last_deliverer         text,
    last_deliverer_active_at timestamptz,
    endpoints_failing      bigint,
    next_give_up_at        timestamptz,
    stuck_work             bigint
)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
    -- NB: the view's plan passes PostgreSQL's JIT threshold on a young
    -- database (estimates of tables autovacuum has not analyzed yet), and
    -- compiling it took 60 - 100 ms for a read of 2 - 4 ms (bin/bench
    -- --only history, BENCH_EXPLAIN=1).
    SET jit = off AS $$
    SELECT * FROM marketing.vw_pipeline_status
$$;
COMMENT ON FUNCTION pipeline.status() IS
    'Whether the delivery worker runs in this database, events by open status (with an enabled endpoint), dead '
    'events, the oldest waiting event''s age, deliveries and failures in the last minute, endpoints, unresolved '
    'errors, events waiting for an endpoint, and the deliverer that last claimed events (the worker, a '
    'pipeline-relay by its name) with when, enabled endpoints failing every request with when the first is '
    'given up, and the companies and slots that are stuck. Reads marketing.vw_pipeline_status: needs no right '
    'on the tables.';

-- Monitoring: pg_monitor (and roles granted it) read the views and status()
-- without any right on the tables, so without seeing secrets or payloads.
GRANT SELECT ON marketing.vw_pipeline_status, marketing.vw_endpoint_health, marketing.vw_pending_events,
                marketing.vw_processing_latency, marketing.vw_pipeline_funnel, marketing.vw_unresolved_errors,
                marketing.vw_error_rate_24h
    TO pg_monitor;
GRANT EXECUTE ON FUNCTION pipeline.status() TO pg_monitor;

-- Handing back claimed events that were never sent (the worker is stopping):
-- pending again, due now (ahead of events created after them), and the claim
-- does not count as an attempt.
CREATE FUNCTION pipeline._release(event_ids bigint[], attempts integer[]) RETURNS integer
LANGUAGE sql SET search_path = pg_catalog, pg_temp
    SET enable_seqscan = off SET enable_bitmapscan = off SET jit = off
    SET enable_hashjoin = off SET enable_mergejoin = off
    SET plan_cache_mode = force_generic_plan AS $$
    -- NB: by primary key whatever the statistics say, as in _settle.
    WITH held AS MATERIALIZED (
        SELECT j.event_id, e.status, e.attempts
        FROM unnest(_release.event_ids, _release.attempts) AS j(event_id, attempt)
        CROSS JOIN LATERAL (SELECT e.status, e.attempts FROM marketing.pipeline_events e
                            WHERE e.id = j.event_id OFFSET 0) e
        WHERE e.status = 'processing' AND e.attempts = j.attempt
    ), released AS (
        UPDATE marketing.pipeline_events e
        -- NB: due since their creation: they go first again.
        SET status = 'pending', attempts = e.attempts - 1, next_attempt_at = least(e.created_at, now()),
            claimed_by = NULL
        FROM held h
        WHERE e.id = h.event_id AND e.status = h.status AND e.attempts = h.attempts
        RETURNING e.id
    )
    SELECT count(*)::integer FROM released
$$;

-- Seconds until the next event with an enabled endpoint is due (negative
-- when one is due already; NULL when none waits), so the worker sleeps
-- exactly until a retry or an expiring lease needs it. skip_types: types
-- the worker is not claiming now (their endpoint is busy or probed).
CREATE FUNCTION pipeline._next_due_in(skip_types text[] DEFAULT NULL) RETURNS double precision
-- NB: plpgsql, so that its statement is planned once per session.
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
    SET enable_seqscan = off SET enable_bitmapscan = off SET jit = off
    SET enable_hashjoin = off SET enable_mergejoin = off
    SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_from bigint := pipeline._settled_below();  -- as in _claim_rows
BEGIN
    RETURN (
        SELECT extract(epoch FROM min(n.next_attempt_at) - clock_timestamp())::double precision
        FROM pipeline.webhooks w
        -- NB: as in _claim_deliveries: an endpoint without credentials is not
        -- claimed for, so its events are not due (else the deliverer spins).
        JOIN pipeline.webhook_credentials c ON c.event_type = w.event_type
        CROSS JOIN LATERAL (
            SELECT e.next_attempt_at
            FROM marketing.pipeline_events e
            WHERE e.event_type = w.event_type AND e.status IN ('pending', 'failed', 'processing') AND e.id >= v_from
            ORDER BY e.next_attempt_at
            LIMIT 1
        ) n
        WHERE w.enabled AND (skip_types IS NULL OR w.event_type::text <> ALL (skip_types)));
END
$$;

-- An endpoint that failed answers again: the events that failed meanwhile
-- are due now instead of on their backoff. Returns how many.
CREATE FUNCTION pipeline._endpoint_recovered(event_type text) RETURNS integer
LANGUAGE sql SET search_path = pg_catalog, pg_temp
    SET enable_seqscan = off SET enable_bitmapscan = off SET jit = off
    SET enable_hashjoin = off SET enable_mergejoin = off
    SET plan_cache_mode = force_generic_plan AS $$
    WITH due AS (
        UPDATE marketing.pipeline_events e
        SET next_attempt_at = now()
        WHERE e.event_type = _endpoint_recovered.event_type
          AND e.status = 'failed' AND e.next_attempt_at > now()
        RETURNING e.id
    )
    SELECT count(*)::integer FROM due
$$;

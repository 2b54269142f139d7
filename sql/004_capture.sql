-- 004_capture.sql: turning row changes into events.
--
-- One trigger function, pipeline._capture(), serves every watched table. What
-- differs between watches (event type, grouping, key columns) travels in the
-- trigger's arguments, and which changes count is the trigger's WHEN clause,
-- evaluated by the executor before any function is called. pipeline.watch()
-- writes such a trigger; the seven stages of 005_stages.sql are watches too.
-- INSERT and DELETE watches without a condition (and grouped watches) are
-- statement triggers with a transition table instead: one INSERT writes
-- all of a statement's events, which makes a multi-row write far cheaper
-- and yields the same events.
--
-- Every event is announced with NOTIFY on the channel pipeline_event. The
-- payload holds only bounded fields (id, event type, table, operation), so it
-- stays far below NOTIFY's 8000-byte limit whatever the row holds.

-- Who may write which events (row-level security on the event queue)
-- ---------------------------------------------------------------------
-- The capture function below runs with the rights of the role whose write
-- fired it: turning a row into JSON calls the output functions and casts of
-- the row's column types, which may belong to whoever owns the table or the
-- type, and such code must never run with more rights than that role has.
-- So every role may INSERT the columns an event is made of (and read back
-- the new id), and the policy pipeline_events_produce decides which rows it
-- may insert:
--   * a row change (INSERT, UPDATE, DELETE), from inside a trigger, of an
--     event type that a watch of that table and operation produces, by a
--     role that may make that change to that table: the events its own
--     writes produce anyway, nothing else;
--   * an EMIT (pipeline.emit) of an event type granted to the role with
--     pipeline.grant_event_type.
-- Status, attempts and the other delivery columns are not insertable: a
-- new event is always pending. The owner of the pipeline (and superusers)
-- are not bound by policies. Reading, claiming and settling events stay
-- governed by table and column privileges alone (see docs/security.md).

-- Event types a role was allowed to produce (by pipeline.watch of its own
-- tables or by pipeline.emit) besides the owner of the pipeline.
CREATE TABLE pipeline.event_type_grants (
    event_type pipeline.event_type NOT NULL,
    grantee    regrole NOT NULL,
    granted_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_type, grantee)
);
COMMENT ON TABLE pipeline.event_type_grants IS
    'Roles allowed to produce events of a type (watch their own tables, emit) besides the pipeline''s owner.';
GRANT SELECT ON pipeline.event_type_grants TO PUBLIC;

-- Whether the current role may produce events of a type: it owns the
-- pipeline (or is a member of the owner), or was granted the type.
CREATE FUNCTION pipeline._may_produce(event_type text) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT pg_has_role((SELECT c.relowner FROM pg_class c WHERE c.oid = 'marketing.pipeline_events'::regclass), 'USAGE')
        OR EXISTS (SELECT 1 FROM pipeline.event_type_grants g
                   JOIN pg_roles r ON r.oid = g.grantee
                   WHERE g.event_type = _may_produce.event_type AND pg_has_role(r.oid, 'USAGE'))
$$;

CREATE FUNCTION pipeline.grant_event_type(event_type text, grantee regrole) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pipeline._check_event_type(event_type);
    IF grantee IS NULL THEN
        RAISE EXCEPTION 'pipeline.grant_event_type: grantee must not be NULL'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    INSERT INTO pipeline.event_type_grants AS g (event_type, grantee)
    VALUES (grant_event_type.event_type, grant_event_type.grantee)
    ON CONFLICT DO NOTHING;
    RETURN FOUND;
END
$$;
COMMENT ON FUNCTION pipeline.grant_event_type(text, regrole) IS
    'Lets a role produce events of a type: watch tables it may put triggers on, and pipeline.emit. '
    'True when newly granted. Only the pipeline''s owner may grant.';

CREATE FUNCTION pipeline.revoke_event_type(event_type text, grantee regrole) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    DELETE FROM pipeline.event_type_grants g
    WHERE g.event_type = revoke_event_type.event_type AND g.grantee = revoke_event_type.grantee;
    RETURN FOUND;
END
$$;
COMMENT ON FUNCTION pipeline.revoke_event_type(text, regrole) IS
    'Takes back a grant of pipeline.grant_event_type (watches made under it stay until unwatched). True when there was one.';

-- The key columns of a row as an object ({"id": 7}): for watches with two
-- or more key columns. One key column, the common case, is picked inline in
-- pipeline._capture() without a function call.
CREATE FUNCTION pipeline._pick(row_json jsonb, keys text[]) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
    SELECT jsonb_object_agg(k, row_json -> k) FROM unnest(keys) AS k
$$;

-- Trigger arguments: [0] event type, [1] group-by column or '', [2..] key columns.
-- NB: SECURITY INVOKER (the default): see the top of this file.
--
-- NB on cost (docs/benchmark-notes.md, "Fifth session"): this runs once per
-- statement or row written to a watched table, and a single-row commit pays
-- for all of it, so it is written to do little per call:
--   * every plpgsql expression outside a query (a DECLARE default, an
--     assignment) is compiled again in each transaction, so each branch
--     declares only what it uses, in a block of its own;
--   * the row becomes JSON once (the payload), and its key columns are read
--     back from that JSON;
--   * the NOTIFY text is the id plus a tail that is the same for every
--     event of the call, built once.
-- Whether turning a row of the table into JSON runs code of no one but a
-- superuser's or the pipeline owner's: every column's type, through
-- domains, arrays and composite types, ends in types that they own (the
-- built-in ones, an extension's). A type of anyone else's may have a cast
-- to json of that role's making, which to_jsonb would run. The watches of
-- such tables are sealed (pipeline._capture_sealed()).
CREATE FUNCTION pipeline._plain_columns(source_table regclass) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    WITH RECURSIVE used (type_oid) AS (
        SELECT a.atttypid FROM pg_attribute a
        WHERE a.attrelid = source_table AND a.attnum > 0 AND NOT a.attisdropped
        UNION
        SELECT part.oid
        FROM used u
        JOIN pg_type t ON t.oid = u.type_oid
        CROSS JOIN LATERAL (
            SELECT t.typbasetype WHERE t.typtype = 'd'
            UNION ALL
            SELECT t.typelem WHERE t.typsubscript = 'pg_catalog.array_subscript_handler'::regproc
            UNION ALL
            SELECT a.atttypid FROM pg_attribute a
            WHERE t.typtype = 'c' AND a.attrelid = t.typrelid AND a.attnum > 0 AND NOT a.attisdropped
        ) AS part(oid)
    )
    SELECT coalesce(bool_and(t.typtype IN ('d', 'c')
                             OR t.typsubscript = 'pg_catalog.array_subscript_handler'::regproc
                             OR r.rolsuper
                             OR t.typowner = (SELECT c.relowner FROM pg_class c
                                              WHERE c.oid = 'marketing.pipeline_events'::regclass)), true)
    FROM used u
    JOIN pg_type t ON t.oid = u.type_oid
    JOIN pg_roles r ON r.oid = t.typowner
$$;

-- The capture function is made three times from this one body:
--   pipeline._capture_stage()   SECURITY DEFINER: writes the event as the
--                              pipeline's owner, behind the stage watches.
--                              Only the owner may execute it, so only the
--                              owner can make a trigger that runs it
--                              (CREATE TRIGGER asks for EXECUTE; firing
--                              does not): it need not look up who called
--                              it. That look-up was about 3.5% of a
--                              single-row intake insert (docs/benchmark-notes.md,
--                              "Seventh pass");
--   pipeline._capture_sealed()  the same, for any role's triggers: it
--                              checks that its trigger is a watch's,
--                              behind the watches of tables whose columns
--                              are plain (pipeline._plain_columns), so that
--                              a writer of the table can insert no event of
--                              the watch's type of its own;
--   pipeline._capture()        with the rights of the role whose write
--                              fired it (see the top of this file), behind
--                              the watches of tables with other types.
DO $install$
DECLARE
    v_body text := $body$
BEGIN
    -- (pipeline._capture_sealed() checks here who called it: see below.)
    -- One event per row, for a whole statement at once (INSERT and DELETE
    -- watches without a condition, see pipeline.watch): the same events as
    -- the row trigger below, but one INSERT for all of them instead of one
    -- per row (executor start, the events table's CHECK prepared again).
    IF TG_LEVEL = 'STATEMENT' AND TG_ARGV[1] = '' THEN
        DECLARE
            -- NB: of the columns' own domains, so that their checks run once
            -- per call here, not once per event row in the INSERT below.
            v_type  pipeline.event_type := TG_ARGV[0];
            v_op    pipeline.event_source_op := TG_OP;
            v_table text := TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME;
            -- '"event_type" : "...", "table" : "...", "op" : "..."}'
            v_tail  text := substr(json_build_object('event_type', TG_ARGV[0], 'table', v_table, 'op', TG_OP)::text, 2);
            v_done  boolean;
        BEGIN
            -- NB: a data-modifying WITH query runs to completion, RETURNING
            -- included, whether or not the main query reads it: each new
            -- event is announced by its own RETURNING, with no aggregate
            -- over the ids.
            WITH ins AS (
                INSERT INTO marketing.pipeline_events (event_type, payload, source_table, source_op, source_key)
                SELECT v_type, r.payload, v_table, v_op,
                       -- NB: the payload has one of "new" and "old".
                       CASE TG_NARGS
                           WHEN 2 THEN NULL
                           WHEN 3 THEN jsonb_build_object(TG_ARGV[2],
                                           coalesce(r.payload -> 'new', r.payload -> 'old') -> TG_ARGV[2])
                           ELSE pipeline._pick(coalesce(r.payload -> 'new', r.payload -> 'old'), TG_ARGV[2:])
                       END
                -- NB: OFFSET 0, or the planner copies the payload's
                -- expression into the key's and converts each row twice.
                FROM (SELECT jsonb_build_object(CASE TG_OP WHEN 'DELETE' THEN 'old' ELSE 'new' END, t) AS payload
                      FROM pipeline_rows t OFFSET 0) r
                RETURNING pg_notify('pipeline_event', '{"id" : ' || id || ', ' || v_tail))
            SELECT true INTO v_done;
        END;
        RETURN NULL;
    END IF;

    IF TG_LEVEL = 'STATEMENT' THEN
        DECLARE
            v_type  pipeline.event_type := TG_ARGV[0];
            v_op    pipeline.event_source_op := TG_OP;
            v_table text := TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME;
        BEGIN
            -- One event per distinct value of the group-by column in this
            -- statement's rows (the transition table named by pipeline.watch).
            EXECUTE format(
                $sql$
                WITH ins AS (
                    INSERT INTO marketing.pipeline_events (event_type, payload, source_table, source_op, source_key)
                    SELECT $1, jsonb_build_object('key', g.k, 'count', g.n, %2$L, g.rows), $2, $3, g.k
                    FROM (SELECT jsonb_build_object(%1$L, t.%1$I) AS k, count(*) AS n,
                                 jsonb_agg(to_jsonb(t)) AS rows
                          FROM %3$I t GROUP BY t.%1$I ORDER BY t.%1$I) g
                    RETURNING id)
                SELECT pg_notify('pipeline_event',
                                 json_build_object('id', id, 'event_type', $1, 'table', $2, 'op', $3)::text)
                FROM ins
                $sql$,
                TG_ARGV[1],
                CASE TG_OP WHEN 'DELETE' THEN 'old' ELSE 'new' END,
                CASE TG_OP WHEN 'DELETE' THEN 'pipeline_old_rows' ELSE 'pipeline_new_rows' END)
            USING v_type, v_table, v_op;
        END;
        RETURN NULL;
    END IF;

    -- One event for this row (UPDATE watches, and watches with a condition).
    DECLARE
        v_type  pipeline.event_type := TG_ARGV[0];
        v_op    pipeline.event_source_op := TG_OP;
        v_table text := TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME;
        v_new   jsonb;
        v_old   jsonb;
        v_key   jsonb;
        v_id    bigint;
    BEGIN
        IF TG_OP <> 'DELETE' THEN
            v_new := to_jsonb(NEW);
        END IF;
        IF TG_OP <> 'INSERT' THEN
            v_old := to_jsonb(OLD);
        END IF;
        IF TG_NARGS = 3 THEN
            v_key := jsonb_build_object(TG_ARGV[2], coalesce(v_new, v_old) -> TG_ARGV[2]);
        ELSIF TG_NARGS > 3 THEN
            v_key := pipeline._pick(coalesce(v_new, v_old), TG_ARGV[2:]);
        END IF;

        INSERT INTO marketing.pipeline_events (event_type, payload, source_table, source_op, source_key)
        VALUES (v_type,
                CASE TG_OP
                    WHEN 'INSERT' THEN jsonb_build_object('new', v_new)
                    WHEN 'UPDATE' THEN jsonb_build_object('new', v_new, 'old', v_old)
                    ELSE jsonb_build_object('old', v_old)
                END,
                v_table, v_op, v_key)
        RETURNING id INTO v_id;

        -- Announced to listeners; the payload holds only bounded fields (id,
        -- event type, table, operation), so it stays far below NOTIFY's
        -- 8000-byte limit whatever the row holds.
        PERFORM pg_notify('pipeline_event',
                          json_build_object('id', v_id, 'event_type', TG_ARGV[0], 'table', v_table, 'op', TG_OP)::text);
    END;
    RETURN NULL;
END
$body$;
    -- The sealed twin runs as the pipeline's owner, for any writer: only
    -- the trigger of a watch, on that watch's own table, may run it; and
    -- for a user's table only while its columns are plain (they may have
    -- changed since the watch was made): else a type's code would run as
    -- the owner. Refused then, with what to do.
    v_seal text := $seal$
    DECLARE
        v_builtin boolean;
    BEGIN
        SELECT w.builtin INTO v_builtin FROM pipeline.watches w
        WHERE w.source_table = TG_RELID AND w.trigger_name = TG_NAME
          AND w.event_type = TG_ARGV[0] AND w.operation = TG_OP;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'pipeline._capture_sealed() runs only as the trigger of a watch'
                USING ERRCODE = 'insufficient_privilege';
        END IF;
        IF NOT v_builtin AND NOT pipeline._plain_columns(TG_RELID) THEN
            RAISE EXCEPTION 'the watch of % for % was made for columns of plain types, and a column is of another type now',
                TG_RELID::regclass, TG_ARGV[0]
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      HINT = format('Call pipeline.watch(%L, %L, %L) again: it chooses again how events are written.',
                                    TG_RELID::regclass::text, TG_ARGV[0], TG_OP);
        END IF;
    END;
$seal$;
BEGIN
    EXECUTE pg_catalog.format(
        'CREATE FUNCTION pipeline._capture() RETURNS trigger '
        'LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS %L', v_body);
    EXECUTE pg_catalog.format(
        'CREATE FUNCTION pipeline._capture_sealed() RETURNS trigger '
        'LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS %L',
        pg_catalog.replace(v_body, '    -- (pipeline._capture_sealed() checks here who called it: see below.)' || E'\n', v_seal));
    EXECUTE pg_catalog.format(
        'CREATE FUNCTION pipeline._capture_stage() RETURNS trigger '
        'LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS %L',
        pg_catalog.replace(v_body, '    -- (pipeline._capture_sealed() checks here who called it: see below.)' || E'\n',
                           '    -- (only the pipeline''s owner may make a trigger that runs pipeline._capture_stage())' || E'\n'));
END
$install$;
COMMENT ON FUNCTION pipeline._capture() IS
    'Trigger function behind every watch: writes the row change as an event, with the rights of the role that changed the row.';
-- Attaching it to a table produces nothing by itself: the policy below
-- accepts its events only for tables and types of a watch.
GRANT EXECUTE ON FUNCTION pipeline._capture() TO PUBLIC;
COMMENT ON FUNCTION pipeline._capture_sealed() IS
    'Trigger function behind the stage watches and the watches of tables with plain columns: writes the row change '
    'as an event with the rights of the pipeline''s owner, so that no writer of the table can insert events of its '
    'own; runs only as the trigger of a watch.';
-- NB: pipeline.watch() runs as the role that watches, which names it in
-- CREATE TRIGGER; the function checks who called it.
GRANT EXECUTE ON FUNCTION pipeline._capture_sealed() TO PUBLIC;
COMMENT ON FUNCTION pipeline._capture_stage() IS
    'Trigger function behind the stage watches: writes the row change as an event with the rights of the pipeline''s '
    'owner. Only the owner may execute it, so only the owner can make a trigger that runs it.';
-- NB: the one thing that keeps other roles' triggers from writing events
-- as the owner with it (CREATE TRIGGER checks EXECUTE; a firing trigger
-- does not).
REVOKE ALL ON FUNCTION pipeline._capture_stage() FROM PUBLIC;


-- Emitting an event by hand (for receivers and scripts): as the caller,
-- for the owner of the pipeline and roles granted the event type.
CREATE FUNCTION pipeline.emit(event_type text, payload jsonb DEFAULT '{}') RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_id bigint;
BEGIN
    IF payload IS NULL THEN
        RAISE EXCEPTION 'pipeline.emit: payload must not be NULL (use ''{}'' for an empty payload)'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    PERFORM pipeline._check_event_type(event_type);
    IF NOT pipeline._may_produce(event_type) THEN
        RAISE EXCEPTION 'pipeline.emit: role % may not produce events of type %', current_user, quote_literal(event_type)
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'The pipeline''s owner allows it with pipeline.grant_event_type(event_type, role).';
    END IF;
    INSERT INTO marketing.pipeline_events (event_type, payload, source_op)
    VALUES (emit.event_type, emit.payload, 'EMIT')
    RETURNING id INTO v_id;
    PERFORM pg_notify('pipeline_event',
                      json_build_object('id', v_id, 'event_type', emit.event_type, 'op', 'EMIT')::text);
    RETURN v_id;
END
$$;
COMMENT ON FUNCTION pipeline.emit(text, jsonb) IS
    'Queues an event that no table change produced and announces it; returns its id. '
    'For the pipeline''s owner and roles granted the event type (pipeline.grant_event_type).';

-- Event types are identifiers: they name triggers and URLs, so they are checked early.
CREATE FUNCTION pipeline._check_event_type(event_type text) RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    -- NB: the same rule as the domain pipeline.event_type (003_events.sql).
    IF event_type IS NULL OR event_type !~ '^[a-z][a-z0-9_]*$' OR length(event_type) > 47 THEN
        RAISE EXCEPTION 'invalid event type %', coalesce(quote_literal(event_type), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'An event type is 1-47 characters: a lower-case letter, then letters, digits or _.';
    END IF;
END
$$;

CREATE TABLE pipeline.watches (
    source_table regclass NOT NULL,
    event_type   text NOT NULL,
    operation    text NOT NULL,
    condition    text,
    columns      text[],
    group_by     text,
    trigger_name name NOT NULL,
    builtin      boolean NOT NULL DEFAULT false,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_table, event_type, operation),
    CONSTRAINT operation_known CHECK (operation IN ('INSERT', 'UPDATE', 'DELETE'))
);
COMMENT ON TABLE pipeline.watches IS
    'Table changes that become events, one row per pipeline.watch call. builtin marks the seven stage watches.';

-- The tables of the pipeline itself: an event about them would feed itself.
-- Their partitions too (015_partitions.sql).
CREATE FUNCTION pipeline._is_internal(source_table regclass) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT n.nspname IN ('pg_catalog', 'information_schema', 'pg_toast', 'pipeline')
        OR c.oid IN (to_regclass('marketing.pipeline_events'), to_regclass('marketing.pipeline_error_log'),
                     to_regclass('marketing.pipeline_delivery_attempts'))
        OR EXISTS (SELECT FROM pg_inherits i
                   WHERE i.inhrelid = c.oid
                     AND i.inhparent IN (to_regclass('marketing.pipeline_events'),
                                         to_regclass('marketing.pipeline_delivery_attempts')))
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = source_table
$$;

-- The event type a trigger's first argument names (tgargs is NUL-separated).
CREATE FUNCTION pipeline._trigger_event_type(tgargs bytea) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT convert_from(substring(tgargs FROM 1 FOR position('\x00'::bytea IN tgargs) - 1), 'UTF8')
    WHERE position('\x00'::bytea IN tgargs) > 0
$$;

-- Whether a capture trigger of that name, event type and operation is on
-- the table (so that a row of pipeline.watches describes a real watch).
CREATE FUNCTION pipeline._capture_trigger_exists(
    source_table regclass, trigger_name name, event_type text, operation text
) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT EXISTS (
        SELECT 1 FROM pg_trigger t
        WHERE t.tgrelid = source_table AND t.tgname = trigger_name
          AND t.tgfoid IN ('pipeline._capture()'::regprocedure, 'pipeline._capture_sealed()'::regprocedure,
                           'pipeline._capture_stage()'::regprocedure)
          AND pipeline._trigger_event_type(t.tgargs) = event_type
          AND (t.tgtype::integer & CASE operation WHEN 'INSERT' THEN 4 WHEN 'DELETE' THEN 8
                                                  WHEN 'UPDATE' THEN 16 ELSE 0 END) <> 0)
$$;

-- A role that may put triggers on a table and was granted an event type
-- may watch the table for it (pipeline.watch), and the row must describe
-- the trigger pipeline.watch made; it may remove its watches again. The
-- stage watches are the owner's.
ALTER TABLE pipeline.watches ENABLE ROW LEVEL SECURITY;
CREATE POLICY watches_read ON pipeline.watches FOR SELECT USING (true);
CREATE POLICY watches_add ON pipeline.watches FOR INSERT
    WITH CHECK (NOT builtin
                AND has_table_privilege(source_table, 'TRIGGER')
                AND NOT pipeline._is_internal(source_table)
                AND pipeline._may_produce(event_type)
                AND pipeline._capture_trigger_exists(source_table, trigger_name, event_type, operation));
CREATE POLICY watches_remove ON pipeline.watches FOR DELETE
    USING (NOT builtin
           AND coalesce(has_table_privilege(source_table, 'TRIGGER'),
                        NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = source_table)));
GRANT SELECT, INSERT, DELETE ON pipeline.watches TO PUBLIC;

-- The events a role may write (see the top of this file).
ALTER TABLE marketing.pipeline_events ENABLE ROW LEVEL SECURITY;
CREATE POLICY pipeline_events_read ON marketing.pipeline_events FOR SELECT USING (true);
CREATE POLICY pipeline_events_settle ON marketing.pipeline_events FOR UPDATE USING (true) WITH CHECK (true);
CREATE POLICY pipeline_events_purge ON marketing.pipeline_events FOR DELETE USING (true);
CREATE POLICY pipeline_events_produce ON marketing.pipeline_events FOR INSERT
    WITH CHECK (
        CASE source_op::text
            WHEN 'EMIT' THEN source_table IS NULL AND pipeline._may_produce(event_type)
            ELSE pg_trigger_depth() > 0
                 AND EXISTS (
                     -- NB: a watch whose trigger writes with the writer's
                     -- rights: the stages' and a sealed watch's (of a
                     -- table with plain columns) are written by
                     -- pipeline._capture_stage() and pipeline._capture_sealed()
                     -- as the owner, never by a writer.
                     SELECT 1
                     FROM pipeline.watches w
                     JOIN pg_class c ON c.oid = w.source_table
                     JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE NOT w.builtin
                       AND EXISTS (SELECT 1 FROM pg_trigger t
                                   WHERE t.tgrelid = w.source_table AND t.tgname = w.trigger_name
                                     AND t.tgfoid = 'pipeline._capture()'::regprocedure)
                       AND w.event_type = pipeline_events.event_type::text
                       AND w.operation = pipeline_events.source_op::text
                       AND n.nspname || '.' || c.relname = pipeline_events.source_table
                       AND CASE w.operation
                               WHEN 'DELETE' THEN has_table_privilege(w.source_table, 'DELETE')
                               ELSE has_any_column_privilege(w.source_table, w.operation)
                           END)
        END);
GRANT INSERT (event_type, payload, source_table, source_op, source_key) ON marketing.pipeline_events TO PUBLIC;
-- The id too, for INSERT ... RETURNING id: ids are no secret (every role
-- may LISTEN on pipeline_event, where each event's id, type, table and
-- operation are announced), and nothing else of the queue is readable.
GRANT SELECT (id) ON marketing.pipeline_events TO PUBLIC;

-- Why a watch condition cannot be pasted into CREATE TRIGGER ... WHEN (...),
-- or NULL when it can. It must be one expression: every quote closed, every
-- parenthesis closed and none closed that it did not open, and no ; $ or
-- comment outside quotes. Then nothing in it can end the WHEN clause or the
-- statement. (Backslashes are refused anywhere, so that E'' strings cannot
-- hide a quote from this scan.)
CREATE FUNCTION pipeline._condition_problem(condition text) RETURNS text
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_len   integer := length(condition);
    v_depth integer := 0;
    v_i     integer := 1;
    v_c     text;
BEGIN
    IF strpos(condition, E'\\') > 0 THEN
        RETURN 'condition must not contain a backslash';
    END IF;
    WHILE v_i <= v_len LOOP
        v_c := substr(condition, v_i, 1);
        IF v_c IN ('''', '"') THEN
            -- A string or quoted identifier ends at the next quote that is not doubled.
            LOOP
                v_i := v_i + 1;
                IF v_i > v_len THEN
                    RETURN format('condition has an unterminated %s',
                                  CASE v_c WHEN '''' THEN 'string' ELSE 'quoted identifier' END);
                END IF;
                IF substr(condition, v_i, 1) = v_c THEN
                    EXIT WHEN substr(condition, v_i + 1, 1) <> v_c;
                    v_i := v_i + 1;
                END IF;
            END LOOP;
        ELSIF v_c = ';' THEN
            RETURN 'condition must be one expression, without ;';
        ELSIF v_c = '$' THEN
            RETURN 'condition must not contain $ outside quotes (no dollar quoting or parameters)';
        ELSIF substr(condition, v_i, 2) IN ('--', '/*') THEN
            RETURN 'condition must not contain comments';
        ELSIF v_c = '(' THEN
            v_depth := v_depth + 1;
        ELSIF v_c = ')' THEN
            v_depth := v_depth - 1;
            IF v_depth < 0 THEN
                RETURN 'condition closes a parenthesis it did not open';
            END IF;
        END IF;
        v_i := v_i + 1;
    END LOOP;
    IF v_depth > 0 THEN
        RETURN 'condition leaves a parenthesis open';
    END IF;
    RETURN NULL;
END
$$;

-- Starting to turn changes of a table into events (replaces an earlier watch
-- of the same table, event type and operation). stage: a stage watch (the
-- install's, the owner's only). The trigger of a stage watch runs
-- pipeline._capture_stage(), that of a table whose columns are plain
-- pipeline._capture_sealed().
CREATE FUNCTION pipeline._watch(
    source_table regclass,
    event_type   text,
    operation    text,
    condition    text,
    columns      text[],
    group_by     text,
    stage        boolean
) RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_capture regprocedure := CASE WHEN stage THEN 'pipeline._capture_stage()'
                                   WHEN pipeline._plain_columns(source_table) THEN 'pipeline._capture_sealed()'
                                   ELSE 'pipeline._capture()' END;
    v_op      text := upper(btrim(operation));
    v_kind    "char";
    v_schema  name;
    v_name    name;
    v_trigger name;
    v_keys    text[];
    v_args    text;
    v_col     text;
    v_sql     text;
    v_per_statement boolean;
BEGIN
    IF source_table IS NULL THEN
        RAISE EXCEPTION 'pipeline.watch: source_table must not be NULL'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT c.relkind, n.nspname, c.relname INTO v_kind, v_schema, v_name
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = source_table;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pipeline.watch: table with OID % does not exist', source_table::oid
            USING ERRCODE = 'undefined_table';
    END IF;
    IF v_kind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION 'pipeline.watch: % is not a table', source_table
            USING ERRCODE = 'wrong_object_type',
                  HINT = 'Only ordinary and partitioned tables can be watched.';
    END IF;
    IF pipeline._is_internal(source_table) THEN
        RAISE EXCEPTION 'pipeline.watch: % cannot be watched', source_table
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'System catalogs and the pipeline''s own tables cannot produce events.';
    END IF;
    PERFORM pipeline._check_event_type(event_type);
    IF NOT pipeline._may_produce(event_type) THEN
        RAISE EXCEPTION 'pipeline.watch: role % may not produce events of type %', current_user, quote_literal(event_type)
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'The pipeline''s owner allows it with pipeline.grant_event_type(event_type, role).';
    END IF;
    IF v_op IS NULL OR v_op NOT IN ('INSERT', 'UPDATE', 'DELETE') THEN
        RAISE EXCEPTION 'pipeline.watch: operation must be INSERT, UPDATE or DELETE, not %',
            coalesce(quote_literal(operation), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF condition IS NOT NULL AND pipeline._is_blank(condition) THEN
        RAISE EXCEPTION 'pipeline.watch: condition is blank; pass NULL for no condition'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF pipeline._condition_problem(condition) IS NOT NULL THEN
        RAISE EXCEPTION 'pipeline.watch: %', pipeline._condition_problem(condition)
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('condition: %s', condition),
                  HINT = 'A condition is one boolean SQL expression over NEW (INSERT), OLD (DELETE) or both (UPDATE).';
    END IF;
    IF columns IS NOT NULL THEN
        IF v_op <> 'UPDATE' THEN
            RAISE EXCEPTION 'pipeline.watch: columns apply only to UPDATE watches'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF cardinality(columns) = 0 THEN
            RAISE EXCEPTION 'pipeline.watch: columns is empty; pass NULL to watch every column'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        FOREACH v_col IN ARRAY columns LOOP
            PERFORM pipeline._check_column(source_table, v_col);
        END LOOP;
    END IF;
    IF group_by IS NOT NULL THEN
        PERFORM pipeline._check_column(source_table, group_by);
        IF condition IS NOT NULL OR columns IS NOT NULL THEN
            RAISE EXCEPTION 'pipeline.watch: group_by cannot be combined with condition or columns'
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'A grouped watch emits one event per group for every statement.';
        END IF;
    END IF;

    -- The primary key travels with each event as source_key.
    SELECT array_agg(a.attname::text ORDER BY k.ord) INTO v_keys
    FROM pg_index i
    CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
    WHERE i.indrelid = source_table AND i.indisprimary;

    v_trigger := format('pipeline_%s_%s', event_type, lower(v_op));
    PERFORM pipeline._drop_watch(source_table, _watch.event_type, v_op);

    -- A statement trigger with a transition table makes all of a statement's
    -- events at once: grouped watches need it, and INSERT and DELETE watches
    -- without a condition are cheaper so (an UPDATE needs OLD and NEW paired,
    -- a condition is a WHEN clause, and only row triggers fire on the
    -- partitions of a partitioned table when they are written directly).
    v_per_statement := group_by IS NOT NULL
                       OR (condition IS NULL AND v_op IN ('INSERT', 'DELETE') AND v_kind = 'r');

    SELECT string_agg(quote_literal(a), ', ') INTO v_args
    FROM unnest(ARRAY[event_type, coalesce(group_by, '')] || coalesce(v_keys, '{}')) AS a;

    v_sql := format('CREATE TRIGGER %I AFTER %s%s ON %s %s FOR EACH %s%s EXECUTE FUNCTION %s(%s)',
        v_trigger,
        v_op,
        CASE WHEN columns IS NOT NULL THEN
            ' OF ' || (SELECT string_agg(quote_ident(c), ', ') FROM unnest(columns) AS c) END,
        source_table,
        CASE WHEN NOT v_per_statement THEN ''
             WHEN group_by IS NULL THEN
                 format('REFERENCING %s TABLE AS pipeline_rows', CASE v_op WHEN 'DELETE' THEN 'OLD' ELSE 'NEW' END)
             WHEN v_op = 'DELETE' THEN 'REFERENCING OLD TABLE AS pipeline_old_rows'
             ELSE 'REFERENCING NEW TABLE AS pipeline_new_rows' END,
        CASE WHEN v_per_statement THEN 'STATEMENT' ELSE 'ROW' END,
        CASE WHEN condition IS NOT NULL THEN ' WHEN (' || condition || ')' END,
        v_capture::oid::regproc,
        v_args);
    BEGIN
        EXECUTE v_sql;
    EXCEPTION WHEN OTHERS THEN
        RAISE EXCEPTION 'pipeline.watch: cannot watch % on %: %', event_type, source_table, SQLERRM
            USING ERRCODE = SQLSTATE, DETAIL = v_sql,
                  HINT = 'A condition is one boolean SQL expression over NEW (INSERT), OLD (DELETE) or both (UPDATE).';
    END;

    -- The condition is pasted into CREATE TRIGGER: make sure it did not turn
    -- the statement into something else.
    IF NOT EXISTS (SELECT 1 FROM pg_trigger t
                   WHERE t.tgrelid = source_table AND t.tgname = v_trigger
                     AND t.tgfoid = v_capture) THEN
        RAISE EXCEPTION 'pipeline.watch: condition % is not a single boolean expression', quote_literal(condition)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    INSERT INTO pipeline.watches (source_table, event_type, operation, condition, columns, group_by, trigger_name,
                                  builtin)
    VALUES (source_table, event_type, v_op, condition, columns, group_by, v_trigger, stage);
    RETURN v_trigger;
END
$$;

CREATE FUNCTION pipeline.watch(
    source_table regclass,
    event_type   text,
    operation    text DEFAULT 'INSERT',
    condition    text DEFAULT NULL,
    columns      text[] DEFAULT NULL,
    group_by     text DEFAULT NULL
) RETURNS text
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    SELECT pipeline._watch(source_table, event_type, operation, condition, columns, group_by, false)
$$;
COMMENT ON FUNCTION pipeline.watch(regclass, text, text, text, text[], text) IS
    'Turns changes of a table into events of event_type: INSERT, UPDATE (optionally OF columns) or DELETE, '
    'filtered by a condition over NEW/OLD, or grouped into one event per group_by value per statement. Returns the trigger name.';

-- Stopping a watch: operation NULL stops every operation of that event type.
CREATE FUNCTION pipeline.unwatch(source_table regclass, event_type text, operation text DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_op   text;
    v_done integer := 0;
BEGIN
    IF source_table IS NULL OR event_type IS NULL THEN
        RAISE EXCEPTION 'pipeline.unwatch: source_table and event_type must not be NULL'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    FOR v_op IN
        SELECT w.operation FROM pipeline.watches w
        WHERE w.source_table = unwatch.source_table AND w.event_type = unwatch.event_type
          AND (unwatch.operation IS NULL OR w.operation = upper(btrim(unwatch.operation)))
    LOOP
        IF pipeline._drop_watch(source_table, event_type, v_op) THEN
            v_done := v_done + 1;
        END IF;
    END LOOP;
    RETURN v_done;
END
$$;
COMMENT ON FUNCTION pipeline.unwatch(regclass, text, text) IS
    'Stops turning changes of a table into events of event_type; returns how many watches were removed.';

-- NB: the trigger is dropped only when it is the capture trigger the row
-- describes: a row of pipeline.watches alone never names a trigger to drop.
CREATE FUNCTION pipeline._drop_watch(source_table regclass, event_type text, operation text) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_trigger name;
BEGIN
    DELETE FROM pipeline.watches w
    WHERE w.source_table = _drop_watch.source_table
      AND w.event_type = _drop_watch.event_type
      AND w.operation = _drop_watch.operation
    RETURNING w.trigger_name INTO v_trigger;
    IF v_trigger IS NULL THEN
        -- Not there, or not this role's to remove (row-level security).
        IF EXISTS (SELECT 1 FROM pipeline.watches w
                   WHERE w.source_table = _drop_watch.source_table
                     AND w.event_type = _drop_watch.event_type
                     AND w.operation = _drop_watch.operation) THEN
            RAISE EXCEPTION 'role % may not remove the % watch of % on %', current_user, operation, event_type, source_table
                USING ERRCODE = 'insufficient_privilege',
                      HINT = 'A watch is removed by a role that may put triggers on its table; the stage watches by the pipeline''s owner.';
        END IF;
        RETURN false;
    END IF;
    -- The table may be gone already (then so is its trigger).
    IF v_trigger IS NOT NULL
       AND pipeline._capture_trigger_exists(source_table, v_trigger, event_type, operation) THEN
        EXECUTE format('DROP TRIGGER %I ON %s', v_trigger, source_table);
    END IF;
    RETURN true;
END
$$;

CREATE FUNCTION pipeline._check_column(source_table regclass, column_name text) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF column_name IS NULL OR NOT EXISTS (
        SELECT 1 FROM pg_attribute
        WHERE attrelid = source_table AND attname = column_name AND attnum > 0 AND NOT attisdropped)
    THEN
        RAISE EXCEPTION 'column % of table % does not exist', coalesce(quote_ident(column_name), 'NULL'), source_table
            USING ERRCODE = 'undefined_column';
    END IF;
END
$$;

-- 004_capture.sql: turning row changes into events.
--
-- One trigger function, pipeline._capture(), serves every watched table. What
-- differs between watches (event type, grouping, key columns) travels in the
-- trigger's arguments, and which changes count is the trigger's WHEN clause,
-- evaluated by the executor before any function is called. pipeline.watch()
-- writes such a trigger; the seven stages of 005_stages.sql are watches too.
--
-- Every event is announced with NOTIFY on the channel pipeline_event. The
-- payload holds only bounded fields (id, event type, table, operation), so it
-- stays far below NOTIFY's 8000-byte limit whatever the row holds.

-- Trigger arguments: [0] event type, [1] group-by column or '', [2..] key columns.
CREATE FUNCTION pipeline._capture() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_table text := TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME;
    v_new   jsonb;
    v_old   jsonb;
    v_key   jsonb;
    v_id    bigint;
    i       integer;
BEGIN
    IF TG_LEVEL = 'STATEMENT' THEN
        -- One event per distinct value of the group-by column in this
        -- statement's rows (the transition table named by pipeline.watch).
        EXECUTE format(
            $sql$
            WITH ins AS (
                INSERT INTO marketing.pipeline_events
                    (event_type, payload, source_table, source_op, source_key)
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
        USING TG_ARGV[0], v_table, TG_OP;
        RETURN NULL;
    END IF;

    IF TG_OP <> 'DELETE' THEN
        v_new := to_jsonb(NEW);
    END IF;
    IF TG_OP <> 'INSERT' THEN
        v_old := to_jsonb(OLD);
    END IF;
    IF TG_NARGS > 2 THEN
        v_key := '{}';
        FOR i IN 2 .. TG_NARGS - 1 LOOP
            v_key := v_key || jsonb_build_object(TG_ARGV[i], coalesce(v_new, v_old) -> TG_ARGV[i]);
        END LOOP;
    END IF;

    INSERT INTO marketing.pipeline_events (event_type, payload, source_table, source_op, source_key)
    VALUES (TG_ARGV[0],
            CASE TG_OP
                WHEN 'INSERT' THEN jsonb_build_object('new', v_new)
                WHEN 'UPDATE' THEN jsonb_build_object('new', v_new, 'old', v_old)
                ELSE jsonb_build_object('old', v_old)
            END,
            v_table, TG_OP, v_key)
    RETURNING id INTO v_id;

    PERFORM pg_notify('pipeline_event',
                      json_build_object('id', v_id, 'event_type', TG_ARGV[0], 'table', v_table, 'op', TG_OP)::text);
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION pipeline._capture() IS
    'Trigger function behind every watch: writes the row change as an event and announces it on pipeline_event.';
-- It writes events with its owner's rights, so a role that may use it in
-- CREATE TRIGGER could forge events of any type: only roles granted EXECUTE
-- (and the owner) can watch tables.
REVOKE ALL ON FUNCTION pipeline._capture() FROM PUBLIC;

-- Emitting an event by hand (for receivers and scripts).
CREATE FUNCTION pipeline.emit(event_type text, payload jsonb DEFAULT '{}') RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_id bigint;
BEGIN
    IF payload IS NULL THEN
        RAISE EXCEPTION 'pipeline.emit: payload must not be NULL (use ''{}'' for an empty payload)'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    PERFORM pipeline._check_event_type(event_type);
    INSERT INTO marketing.pipeline_events (event_type, payload, source_op)
    VALUES (emit.event_type, emit.payload, 'EMIT')
    RETURNING id INTO v_id;
    PERFORM pg_notify('pipeline_event',
                      json_build_object('id', v_id, 'event_type', emit.event_type, 'op', 'EMIT')::text);
    RETURN v_id;
END
$$;
COMMENT ON FUNCTION pipeline.emit(text, jsonb) IS
    'Queues an event that no table change produced and announces it; returns its id.';

-- Event types are identifiers: they name triggers and URLs, so they are checked early.
CREATE FUNCTION pipeline._check_event_type(event_type text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF event_type IS NULL OR event_type !~ '^[a-z][a-z0-9_]{0,46}$' THEN
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

-- Starting to turn changes of a table into events (replaces an earlier watch
-- of the same table, event type and operation).
CREATE FUNCTION pipeline.watch(
    source_table regclass,
    event_type   text,
    operation    text DEFAULT 'INSERT',
    condition    text DEFAULT NULL,
    columns      text[] DEFAULT NULL,
    group_by     text DEFAULT NULL
) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_op      text := upper(btrim(operation));
    v_kind    "char";
    v_schema  name;
    v_name    name;
    v_trigger name;
    v_keys    text[];
    v_args    text;
    v_col     text;
    v_sql     text;
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
    IF v_schema IN ('pg_catalog', 'information_schema', 'pg_toast', 'pipeline')
       OR (v_schema = 'marketing' AND v_name IN ('pipeline_events', 'pipeline_error_log')) THEN
        RAISE EXCEPTION 'pipeline.watch: % cannot be watched', source_table
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'System catalogs and the pipeline''s own tables cannot produce events.';
    END IF;
    PERFORM pipeline._check_event_type(event_type);
    IF v_op IS NULL OR v_op NOT IN ('INSERT', 'UPDATE', 'DELETE') THEN
        RAISE EXCEPTION 'pipeline.watch: operation must be INSERT, UPDATE or DELETE, not %',
            coalesce(quote_literal(operation), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF condition IS NOT NULL AND pipeline._is_blank(condition) THEN
        RAISE EXCEPTION 'pipeline.watch: condition is blank; pass NULL for no condition'
            USING ERRCODE = 'invalid_parameter_value';
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
    PERFORM pipeline._drop_watch(source_table, watch.event_type, v_op);

    SELECT string_agg(quote_literal(a), ', ') INTO v_args
    FROM unnest(ARRAY[event_type, coalesce(group_by, '')] || coalesce(v_keys, '{}')) AS a;

    v_sql := format('CREATE TRIGGER %I AFTER %s%s ON %s %s FOR EACH %s%s EXECUTE FUNCTION pipeline._capture(%s)',
        v_trigger,
        v_op,
        CASE WHEN columns IS NOT NULL THEN
            ' OF ' || (SELECT string_agg(quote_ident(c), ', ') FROM unnest(columns) AS c) END,
        source_table,
        CASE WHEN group_by IS NULL THEN ''
             WHEN v_op = 'DELETE' THEN 'REFERENCING OLD TABLE AS pipeline_old_rows'
             ELSE 'REFERENCING NEW TABLE AS pipeline_new_rows' END,
        CASE WHEN group_by IS NULL THEN 'ROW' ELSE 'STATEMENT' END,
        CASE WHEN condition IS NOT NULL THEN ' WHEN (' || condition || ')' END,
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
                     AND t.tgfoid = 'pipeline._capture()'::regprocedure) THEN
        RAISE EXCEPTION 'pipeline.watch: condition % is not a single boolean expression', quote_literal(condition)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    INSERT INTO pipeline.watches (source_table, event_type, operation, condition, columns, group_by, trigger_name)
    VALUES (source_table, event_type, v_op, condition, columns, group_by, v_trigger);
    RETURN v_trigger;
END
$$;
COMMENT ON FUNCTION pipeline.watch(regclass, text, text, text, text[], text) IS
    'Turns changes of a table into events of event_type: INSERT, UPDATE (optionally OF columns) or DELETE, '
    'filtered by a condition over NEW/OLD, or grouped into one event per group_by value per statement. Returns the trigger name.';

-- Stopping a watch: operation NULL stops every operation of that event type.
CREATE FUNCTION pipeline.unwatch(source_table regclass, event_type text, operation text DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql AS $$
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
        PERFORM pipeline._drop_watch(source_table, event_type, v_op);
        v_done := v_done + 1;
    END LOOP;
    RETURN v_done;
END
$$;
COMMENT ON FUNCTION pipeline.unwatch(regclass, text, text) IS
    'Stops turning changes of a table into events of event_type; returns how many watches were removed.';

CREATE FUNCTION pipeline._drop_watch(source_table regclass, event_type text, operation text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_trigger name;
BEGIN
    DELETE FROM pipeline.watches w
    WHERE w.source_table = _drop_watch.source_table
      AND w.event_type = _drop_watch.event_type
      AND w.operation = _drop_watch.operation
    RETURNING w.trigger_name INTO v_trigger;
    -- The table may be gone already (then so is its trigger).
    IF v_trigger IS NOT NULL AND EXISTS (SELECT 1 FROM pg_class WHERE oid = source_table) THEN
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', v_trigger, source_table);
    END IF;
END
$$;

CREATE FUNCTION pipeline._check_column(source_table regclass, column_name text) RETURNS void
LANGUAGE plpgsql STABLE AS $$
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

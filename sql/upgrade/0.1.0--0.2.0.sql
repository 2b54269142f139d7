-- ==== from sql/001_schemas.sql ====

-- 001_schemas.sql: the three schemas of the outreach pipeline.
--
-- The files sql/NNN_*.sql are the single source of every SQL object: the
-- extension loads them in this order, and bin/build-trigger-only concatenates
-- the same files into the trigger-only script for hosts such as Neon.
--
-- Security (PostgreSQL's "Security Considerations for Extension Scripts" and
-- "Writing SECURITY DEFINER Functions Safely"):
--   * While these files run, names resolve in pg_catalog only: a function,
--     operator or type that the database owner (or anyone who may create in
--     public or in a schema named like the installing role) planted never runs.
--     Every object of the pipeline is created and referenced schema-qualified.
--   * Every function runs with search_path = pg_catalog, pg_temp, whoever
--     calls it, so a caller's search_path cannot redirect its names either.
--     The few SQL functions left inlinable (they sit in CHECK constraints on
--     the write path) qualify every operator instead.
--   * Little runs with raised rights, and only what must: the capture of
--     the stage watches and of tables with plain columns
--     (pipeline._capture_stage, pipeline._capture_sealed, 004_capture.sql)
--     and the making and dropping of the history's partitions
--     (pipeline._maintain_partitions, 015_partitions.sql) are SECURITY
--     DEFINER, each checked as docs/security.md says. Other watched rows
--     become JSON as the role that wrote them, and what it may then write
--     to the event queue is decided by row-level security policies
--     (004_capture.sql). Queue consumers get column privileges only.

SET LOCAL search_path = pg_catalog, pg_temp;

-- ==== the upgrade from 0.1.0 to 0.2.0 ====
--
-- Tables keep their rows: they are changed in place below, where the
-- 0.2.0 install script creates them. Everything that is code (views and
-- the SQL and plpgsql functions) is dropped first and made again exactly
-- as 0.2.0 writes it, with the triggers and CHECK constraints that call
-- those functions; the triggers of every watch, users' own tables
-- included, are made again at the end from pipeline.watches.
--
-- Nothing of a user's is dropped along the way: a view, function, trigger
-- or constraint outside the pipeline that uses one of its views or
-- functions stops the upgrade before anything changed, named in the error.

DO $upgrade$
DECLARE
    v_ours regnamespace[] := ARRAY['intake'::regnamespace, 'marketing'::regnamespace, 'pipeline'::regnamespace];
    v_theirs text;
    v_object record;
BEGIN
    SELECT string_agg(DISTINCT pg_catalog.pg_describe_object(d.classid, d.objid, d.objsubid), ', ') INTO v_theirs
    FROM pg_catalog.pg_depend d
    WHERE d.deptype OPERATOR(pg_catalog.=) 'n'
      AND ((d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_proc'::pg_catalog.regclass
            AND d.refobjid IN (SELECT p.oid FROM pg_catalog.pg_proc p
                               JOIN pg_catalog.pg_language l ON l.oid OPERATOR(pg_catalog.=) p.prolang
                               WHERE p.pronamespace OPERATOR(pg_catalog.=) 'pipeline'::regnamespace
                                 AND l.lanname OPERATOR(pg_catalog.<>) 'c'))
           OR (d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
               AND d.refobjid IN (SELECT c.oid FROM pg_catalog.pg_class c
                                  WHERE c.relkind OPERATOR(pg_catalog.=) 'v'
                                    AND c.relnamespace OPERATOR(pg_catalog.=) ANY (v_ours))))
      AND NOT (
          -- the pipeline's own views (through their rewrite rules) ...
          (d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_rewrite'::pg_catalog.regclass
           AND EXISTS (SELECT FROM pg_catalog.pg_rewrite r JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) r.ev_class
                       WHERE r.oid OPERATOR(pg_catalog.=) d.objid AND c.relnamespace OPERATOR(pg_catalog.=) ANY (v_ours)))
          -- ... its functions, and the constraints of its tables ...
          OR (d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_proc'::pg_catalog.regclass
              AND EXISTS (SELECT FROM pg_catalog.pg_proc p WHERE p.oid OPERATOR(pg_catalog.=) d.objid
                          AND p.pronamespace OPERATOR(pg_catalog.=) 'pipeline'::regnamespace))
          OR (d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_constraint'::pg_catalog.regclass
              AND EXISTS (SELECT FROM pg_catalog.pg_constraint co WHERE co.oid OPERATOR(pg_catalog.=) d.objid
                          AND co.connamespace OPERATOR(pg_catalog.=) ANY (v_ours)))
          -- ... and the triggers of watches, made again below.
          OR (d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_trigger'::pg_catalog.regclass
              AND EXISTS (SELECT FROM pg_catalog.pg_trigger t JOIN pipeline.watches w
                                 ON w.source_table OPERATOR(pg_catalog.=) t.tgrelid::pg_catalog.regclass
                                AND w.trigger_name OPERATOR(pg_catalog.=) t.tgname
                          WHERE t.oid OPERATOR(pg_catalog.=) d.objid)));
    IF v_theirs IS NOT NULL THEN
        RAISE EXCEPTION 'pipeline_ext 0.1.0 to 0.2.0: objects outside the pipeline use its views or functions: %', v_theirs
            USING HINT = 'The upgrade makes the pipeline''s views and functions again. Drop these objects, upgrade, then create them again.';
    END IF;

    FOR v_object IN
        -- NB: names as text, taken before any drop: a view or function that an
        -- earlier CASCADE dropped would print as a bare OID.
        SELECT c.oid::pg_catalog.regclass::text AS name FROM pg_catalog.pg_class c
        WHERE c.relkind OPERATOR(pg_catalog.=) 'v' AND c.relnamespace OPERATOR(pg_catalog.=) ANY (v_ours)
    LOOP
        EXECUTE pg_catalog.format('DROP VIEW IF EXISTS %s CASCADE', v_object.name);
    END LOOP;
    FOR v_object IN
        SELECT p.oid::pg_catalog.regprocedure::text AS name FROM pg_catalog.pg_proc p
        JOIN pg_catalog.pg_language l ON l.oid OPERATOR(pg_catalog.=) p.prolang
        WHERE p.pronamespace OPERATOR(pg_catalog.=) 'pipeline'::regnamespace AND l.lanname OPERATOR(pg_catalog.<>) 'c'
    LOOP
        EXECUTE pg_catalog.format('DROP FUNCTION IF EXISTS %s CASCADE', v_object.name);
    END LOOP;
END
$upgrade$;

COMMENT ON SCHEMA intake IS
    'Raw company records as they arrive, before validation.';

COMMENT ON SCHEMA marketing IS
    'Validated companies, their role slots and contacts, email checks, and the pipeline event queue.';

-- (The extension's schema: sql/upgrade/0.1.0--0.2.0.extension.sql.)

COMMENT ON SCHEMA pipeline IS
    'The pipeline_ext API: watches, queue operations, error handling and self-checks.';


-- Looking names up in these schemas is harmless on its own: every table,
-- view and function in them has privileges of its own. Writers of watched
-- tables need it, since their own rights store the events (004_capture.sql).
GRANT USAGE ON SCHEMA marketing, pipeline TO PUBLIC;


-- The version of the objects installed here, in either mode (an upgrade
-- script of the trigger-only mode checks it before it changes anything).
CREATE FUNCTION pipeline.version() RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
    SELECT '0.2.0'
$$;

COMMENT ON FUNCTION pipeline.version() IS
    'The version of pipeline_ext whose objects are installed in this database (extension or trigger-only).';


-- ==== from sql/002_stage_tables.sql ====

-- 002_stage_tables.sql: the tables each stage of the pipeline writes.
--
-- intake.company_raw_intake   stage 1-2: companies as imported, then validated
-- marketing.company_master    stage 3:   validated companies, one row per domain
-- marketing.company_slots     stage 4-5: one row per role slot (ceo, cfo, ...) of a
--                                        company, holding the contact that fills it
-- marketing.email_verification stage 6:  every verification of a slot's email
-- Stage 7 (outreach ready) is the view marketing.vw_outreach_ready (008_views.sql).
--
-- Raw intake keeps what the source sent (validation is a stage of its own), but
-- refuses values no stage could use: a blank or control-character company name,
-- an absurdly long one. Later tables hold cleaned data and check it harder.

-- Characters that look like nothing: a company name made only of these is blank.
-- (ASCII space, no-break space, zero-width space/joiners, word joiner,
-- ideographic space, byte order mark.)
-- NB: inlined into the CHECK constraints below, so it has no SET clause (that
-- would stop inlining on every write); every name in it is qualified instead.
CREATE FUNCTION pipeline._is_blank(value text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT pg_catalog.btrim(value,
        U&' \00A0\200B\200C\200D\2060\3000\FEFF'::pg_catalog.text) OPERATOR(pg_catalog.=) ''::pg_catalog.text
$$;

COMMENT ON FUNCTION pipeline._is_blank(text) IS
    'True when a text holds nothing but spaces, including Unicode no-break and zero-width ones.';


-- A website the pipeline can use: an http(s) URL whose host has a dot, with
-- no spaces and no user or password part, at most 2048 characters. The CHECK
-- of marketing.company_master calls it, and so does the validation stage
-- (pipeline.website_problem, 009_stage_work.sql): a company that passes
-- validation is never refused by the next stage's table.
-- NB: inlined like pipeline._is_blank: no SET clause, every name qualified.
CREATE FUNCTION pipeline._is_http_url(website text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT website OPERATOR(pg_catalog.~*)
               '^https?://[^\s/?#@:]+\.[^\s/?#@:]+(:[0-9]{1,5})?([/?#]\S*)?$'::pg_catalog.text
       AND pg_catalog.char_length(website) OPERATOR(pg_catalog.<=) 2048
$$;

COMMENT ON FUNCTION pipeline._is_http_url(text) IS
    'True when a website is an http(s) URL whose host has a dot, without spaces or user part, at most 2048 characters.';


-- What a website names, read as an http(s) URL: the value without the
-- spaces around it, and a bare domain (acme.example, www.acme.example/team,
-- as CSV exports write them) as https://<domain>. Anything else is returned
-- as it is (trimmed), for pipeline._is_http_url and pipeline.website_problem
-- to judge. Promotion stores this form in marketing.company_master.
-- NB: inlined (no SET clause, every name qualified).
CREATE FUNCTION pipeline.website_url(website text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN pg_catalog.btrim(website, E' \t\r\n') OPERATOR(pg_catalog.~*) '^https?://'::pg_catalog.text
            THEN pg_catalog.btrim(website, E' \t\r\n')
        WHEN pg_catalog.btrim(website, E' \t\r\n') OPERATOR(pg_catalog.~)
                 '^[^\s/?#@:]+\.[^\s/?#@:]+(:[0-9]{1,5})?([/?#]\S*)?$'::pg_catalog.text
            THEN 'https://'::pg_catalog.text OPERATOR(pg_catalog.||) pg_catalog.btrim(website, E' \t\r\n')
        ELSE pg_catalog.btrim(website, E' \t\r\n')
    END
$$;
COMMENT ON FUNCTION pipeline.website_url(text) IS
    'A website as an http(s) URL: trimmed, and a bare domain (acme.example) read as https://acme.example.';

-- One spelling per host name: lower case, no trailing dot, and an
-- internationalised name in its ASCII form (punycode, RFC 3492: the form
-- DNS, TLS certificates and the services use), so that münchen.example and
-- xn--mnchen-3ya.example are one company. Non-ASCII labels are put in
-- Unicode NFC and lower-cased by code point (Latin-1, Latin Extended-A,
-- Greek and Cyrillic capitals), not by the database's locale: the result
-- is a unique key and must not depend on lc_ctype. NULL for an empty host.
CREATE FUNCTION pipeline._canonical_host(host text) RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_host   text := rtrim(lower(host COLLATE "C"), '.');
    v_labels text[];
    v_out    text[] := '{}';
    v_label  text;
    v_cps    integer[];
    v_cp     integer;
    v_basic  text;
    v_enc    text;
    v_n      integer;
    v_delta  bigint;
    v_bias   integer;
    v_h      integer;
    v_b      integer;
    v_m      integer;
    v_q      bigint;
    v_k      integer;
    v_t      integer;
    v_d      integer;
BEGIN
    IF v_host IS NULL OR v_host = '' THEN
        RETURN NULL;
    END IF;
    IF v_host ~ '^[\x01-\x7f]*$' THEN
        RETURN v_host;
    END IF;
    IF getdatabaseencoding() = 'UTF8' THEN
        v_host := normalize(v_host, NFC);
    END IF;
    -- Full stops of other scripts (ideographic, fullwidth, halfwidth) separate labels too.
    v_labels := string_to_array(translate(v_host, U&'\3002\FF0E\FF61', '...'), '.');
    FOREACH v_label IN ARRAY v_labels LOOP
        IF v_label ~ '^[\x01-\x7f]*$' THEN
            v_out := v_out || v_label;
            CONTINUE;
        END IF;
        -- Code points, lower-cased.
        v_cps := '{}';
        FOR v_d IN 1 .. char_length(v_label) LOOP
            v_cp := ascii(substr(v_label, v_d, 1));
            v_cp := CASE
                WHEN v_cp BETWEEN 65 AND 90 THEN v_cp + 32
                WHEN v_cp BETWEEN 192 AND 222 AND v_cp <> 215 THEN v_cp + 32
                WHEN v_cp BETWEEN 256 AND 311 AND v_cp % 2 = 0 THEN v_cp + 1
                WHEN v_cp BETWEEN 313 AND 328 AND v_cp % 2 = 1 THEN v_cp + 1
                WHEN v_cp BETWEEN 330 AND 375 AND v_cp % 2 = 0 THEN v_cp + 1
                WHEN v_cp = 376 THEN 255
                WHEN v_cp BETWEEN 377 AND 382 AND v_cp % 2 = 1 THEN v_cp + 1
                WHEN v_cp BETWEEN 913 AND 939 AND v_cp <> 930 THEN v_cp + 32
                WHEN v_cp BETWEEN 1040 AND 1071 THEN v_cp + 32
                WHEN v_cp BETWEEN 1024 AND 1039 THEN v_cp + 80
                ELSE v_cp
            END;
            v_cps := v_cps || v_cp;
        END LOOP;
        -- RFC 3492, 6.3: the basic code points, a delimiter, then the deltas.
        v_basic := (SELECT coalesce(string_agg(chr(c), '' ORDER BY i), '')
                    FROM unnest(v_cps) WITH ORDINALITY AS u(c, i) WHERE c < 128);
        v_b := char_length(v_basic);
        v_h := v_b;
        v_enc := v_basic || CASE WHEN v_b > 0 THEN '-' ELSE '' END;
        v_n := 128;
        v_delta := 0;
        v_bias := 72;
        WHILE v_h < cardinality(v_cps) LOOP
            SELECT min(c) INTO v_m FROM unnest(v_cps) AS u(c) WHERE c >= v_n;
            v_delta := v_delta + (v_m - v_n)::bigint * (v_h + 1);
            v_n := v_m;
            FOREACH v_cp IN ARRAY v_cps LOOP
                IF v_cp < v_n THEN
                    v_delta := v_delta + 1;
                END IF;
                IF v_cp = v_n THEN
                    v_q := v_delta;
                    v_k := 36;
                    LOOP
                        v_t := CASE WHEN v_k <= v_bias THEN 1 WHEN v_k >= v_bias + 26 THEN 26 ELSE v_k - v_bias END;
                        EXIT WHEN v_q < v_t;
                        v_d := v_t + ((v_q - v_t) % (36 - v_t))::integer;
                        v_enc := v_enc || chr(CASE WHEN v_d < 26 THEN 97 + v_d ELSE 22 + v_d END);
                        v_q := (v_q - v_t) / (36 - v_t);
                        v_k := v_k + 36;
                    END LOOP;
                    v_enc := v_enc || chr(CASE WHEN v_q < 26 THEN 97 + v_q::integer ELSE 22 + v_q::integer END);
                    -- Bias adaptation (RFC 3492, 6.1).
                    v_delta := CASE WHEN v_h = v_b THEN v_delta / 700 ELSE v_delta / 2 END;
                    v_delta := v_delta + v_delta / (v_h + 1);
                    v_k := 0;
                    WHILE v_delta > 455 LOOP
                        v_delta := v_delta / 35;
                        v_k := v_k + 36;
                    END LOOP;
                    v_bias := v_k + (36 * v_delta / (v_delta + 38))::integer;
                    v_delta := 0;
                    v_h := v_h + 1;
                END IF;
            END LOOP;
            v_delta := v_delta + 1;
            v_n := v_n + 1;
        END LOOP;
        v_out := v_out || ('xn--' || v_enc);
    END LOOP;
    RETURN array_to_string(v_out, '.');
END
$$;
COMMENT ON FUNCTION pipeline._canonical_host(text) IS
    'A host name in one spelling: lower case, no trailing dot, internationalised labels as punycode (xn--...).';

-- The domain a company is known by: the host of its website (read as
-- pipeline.website_url does) in pipeline._canonical_host's spelling, without
-- a leading www. marketing.company_master keeps one company per domain, and
-- validation looks for duplicates by it: Acme.example, www.acme.example.,
-- https://ACME.example/team and acme.example are one company.
-- NB: inlined (no SET clause, every name qualified).
CREATE FUNCTION pipeline.website_domain(website text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT pg_catalog.regexp_replace(
               pipeline._canonical_host(pg_catalog.substring(pipeline.website_url(website),
                                                             '^[hH][tT][tT][pP][sS]?://([^/:?#@]+)'::pg_catalog.text)),
               '^www\.'::pg_catalog.text, ''::pg_catalog.text)
$$;
COMMENT ON FUNCTION pipeline.website_domain(text) IS
    'The host of a website (a URL or a bare domain) in one spelling: lower case, no trailing dot, no leading www., '
    'internationalised names as punycode (NULL when it names no host).';

-- An email address the pipeline can use: something@host.with.dot, no spaces,
-- at most 320 characters. The CHECKs of marketing.company_slots and
-- marketing.email_verification call it, and so does the enrichment stage
-- (pipeline.record_enrichment, 009_stage_work.sql), which leaves out an
-- address the table would refuse instead of failing on it.
-- NB: inlined (no SET clause, every name qualified).
CREATE FUNCTION pipeline._is_email(email text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT email OPERATOR(pg_catalog.~) '^[^@\s]+@[^@\s]+\.[^@\s]+$'::pg_catalog.text
       AND pg_catalog.char_length(email) OPERATOR(pg_catalog.<=) 320
$$;

COMMENT ON FUNCTION pipeline._is_email(text) IS
    'True when a text is an email address the pipeline can use (local@host.with.dot, no spaces, at most 320 characters).';


COMMENT ON TABLE intake.company_raw_intake IS
    'Stage 1-2. Companies as imported. INSERT emits company_created; setting validated to true emits company_validated.';

COMMENT ON COLUMN intake.company_raw_intake.company IS 'Company name as the source gave it (1-500 characters, not blank).';

COMMENT ON COLUMN intake.company_raw_intake.website IS 'Website as the source gave it; the validation stage judges it.';

COMMENT ON COLUMN intake.company_raw_intake.import_batch_id IS 'Identifier of the import (file, list, run) the row came in with.';

COMMENT ON COLUMN intake.company_raw_intake.source IS 'Where the row came from (e.g. apollo, csv, manual).';

COMMENT ON COLUMN intake.company_raw_intake.raw IS 'The untouched source record, for audit and re-validation.';

COMMENT ON COLUMN intake.company_raw_intake.validated IS 'True once the validation stage accepted the row.';

COMMENT ON COLUMN intake.company_raw_intake.validation_status IS 'pending, valid or invalid: the outcome of validation.';

COMMENT ON COLUMN intake.company_raw_intake.validation_errors IS 'Why validation rejected the row (empty when valid or pending).';

-- company_master: the website rule and the domain are the functions above, so
-- that validation and the table cannot disagree. PostgreSQL 15 cannot change
-- a generated column's expression: the column is made again (it becomes the
-- table's last column) with its unique key. A row whose website the rule
-- now refuses, or two rows that now share a domain, stop the upgrade with
-- the constraint's name; nothing is changed then.
ALTER TABLE marketing.company_master
    DROP CONSTRAINT website_is_http_url,
    DROP COLUMN domain;
ALTER TABLE marketing.company_master
    ADD COLUMN domain text GENERATED ALWAYS AS (pipeline.website_domain(website)) STORED,
    ADD CONSTRAINT company_master_domain_key UNIQUE (domain),
    ADD CONSTRAINT website_is_http_url CHECK (pipeline._is_http_url(website)),
    ADD CONSTRAINT company_name_not_blank CHECK (NOT pipeline._is_blank(company_name));
ALTER TABLE intake.company_raw_intake
    ADD CONSTRAINT company_not_blank CHECK (NOT pipeline._is_blank(company));


COMMENT ON TABLE marketing.company_master IS
    'Stage 3. Validated companies, one per domain. INSERT emits company_promoted.';

COMMENT ON COLUMN marketing.company_master.intake_id IS 'The intake row this company was promoted from (NULL if entered by hand).';

COMMENT ON COLUMN marketing.company_master.website IS 'Normalised http(s) URL of the company website.';

COMMENT ON COLUMN marketing.company_master.domain IS 'Host of the website in one spelling (pipeline.website_domain: lower case, no www., no trailing dot, punycode); '
    'unique, so a company is promoted once.';

ALTER TABLE marketing.company_slots
    DROP CONSTRAINT email_format,
    ADD CONSTRAINT email_format CHECK (pipeline._is_email(email));


COMMENT ON TABLE marketing.company_slots IS
    'Stage 4-5. One row per role slot of a company and the contact who fills it. '
    'INSERT emits one slots_created per company per statement; enrichment_status becoming enriched emits contact_enriched.';

COMMENT ON COLUMN marketing.company_slots.slot_role IS 'The role to fill: lower-case identifier such as ceo, cfo, hr.';

COMMENT ON COLUMN marketing.company_slots.enrichment_status IS
    'pending, in_progress, enriched, not_found or failed. enriched needs a name or an email.';

ALTER TABLE marketing.email_verification
    DROP CONSTRAINT email_format,
    ADD CONSTRAINT email_format CHECK (pipeline._is_email(email));


COMMENT ON TABLE marketing.email_verification IS
    'Stage 6. Every verification of a contact email; the newest per slot counts. INSERT emits email_verified.';

COMMENT ON COLUMN marketing.email_verification.result IS 'valid, invalid, risky, catch_all or unknown. Only valid makes a contact outreach ready.';

COMMENT ON COLUMN marketing.email_verification.score IS 'The verifier''s confidence, 0-100, when it gives one.';

-- The same values, checked without a counted repetition (cheaper).
ALTER DOMAIN pipeline.event_type DROP CONSTRAINT event_type_format;
ALTER DOMAIN pipeline.event_type ADD CONSTRAINT event_type_format
    CHECK (VALUE ~ '^[a-z][a-z0-9_]*$' AND length(VALUE) <= 47);

COMMENT ON DOMAIN pipeline.event_type IS 'Lower-case identifier: a letter, then letters, digits or _, at most 47 characters.';

-- Which deliverer holds a claimed event (pipeline.release_claims).
ALTER TABLE marketing.pipeline_events ADD COLUMN claimed_by text;

-- The event history becomes partitioned (015_partitions.sql). The 0.1.0
-- tables of events and attempts keep their rows and become the first
-- partitions: renamed here, with their indexes named as a new partition's
-- are, and without what the partitioned tables hold from now on (identity,
-- triggers, policies, privileges, comments); the foreign keys to the events
-- go. pipeline._add_partitions(0) attaches them further down, reading each
-- once to prove its ids fit (UPGRADING.md gives the time for a million
-- events); nothing is rewritten. The id sequences are made again with the
-- partitioned tables, at the values they had.
DO $partitions$
DECLARE
    v_table  text;
    v_old    regclass;
    v_name   text;
    v_column text;
    v_next   bigint;
BEGIN
    IF (SELECT max(e.id) FROM marketing.pipeline_events e) >= 68719476736 THEN
        RAISE EXCEPTION 'pipeline_ext 0.1.0 to 0.2.0: marketing.pipeline_events has ids of 2^36 and more'
            USING HINT = 'The first partition of the events holds ids below 2^36 (68719476736); ask the project for a conversion of larger ids.';
    END IF;
    ALTER TABLE marketing.pipeline_error_log DROP CONSTRAINT pipeline_error_log_event_id_fkey;
    ALTER TABLE marketing.pipeline_delivery_attempts DROP CONSTRAINT pipeline_delivery_attempts_event_id_fkey;
    FOREACH v_table IN ARRAY ARRAY['pipeline_events', 'pipeline_delivery_attempts'] LOOP
        v_old := format('marketing.%I', v_table)::regclass;
        EXECUTE format('SELECT CASE WHEN s.is_called THEN s.last_value + 1 ELSE s.last_value END FROM %s s',
                       pg_get_serial_sequence(v_old::text, 'id'))
            INTO v_next;
        PERFORM set_config('pipeline_upgrade.' || v_table || '_next_id', v_next::text, true);
        EXECUTE format('ALTER TABLE %s ALTER COLUMN id DROP IDENTITY', v_old);
        FOR v_name IN SELECT t.tgname FROM pg_trigger t WHERE t.tgrelid = v_old AND NOT t.tgisinternal LOOP
            EXECUTE format('DROP TRIGGER %I ON %s', v_name, v_old);
        END LOOP;
        FOR v_name IN SELECT p.polname FROM pg_policy p WHERE p.polrelid = v_old LOOP
            EXECUTE format('DROP POLICY %I ON %s', v_name, v_old);
        END LOOP;
        EXECUTE format('ALTER TABLE %s DISABLE ROW LEVEL SECURITY', v_old);
        EXECUTE format('REVOKE ALL ON %s FROM PUBLIC', v_old);
        FOR v_name IN SELECT DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END
                      FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) a
                      WHERE c.oid = v_old AND a.grantee <> c.relowner LOOP
            EXECUTE format('REVOKE ALL ON %s FROM %s', v_old, v_name);
        END LOOP;
        FOR v_column, v_name IN
            SELECT DISTINCT t.attname, CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END
            FROM pg_attribute t CROSS JOIN LATERAL aclexplode(t.attacl) a
            WHERE t.attrelid = v_old AND t.attnum > 0 LOOP
            EXECUTE format('REVOKE ALL (%I) ON %s FROM %s', v_column, v_old, v_name);
        END LOOP;
        FOR v_column IN
            SELECT t.attname FROM pg_attribute t
            JOIN pg_description d ON d.classoid = 'pg_class'::regclass AND d.objoid = t.attrelid AND d.objsubid = t.attnum
            WHERE t.attrelid = v_old AND t.attnum > 0 LOOP
            EXECUTE format('COMMENT ON COLUMN %s.%I IS NULL', v_old, v_column);
        END LOOP;
        EXECUTE format('COMMENT ON TABLE %s IS NULL', v_old);
        EXECUTE format('ALTER TABLE %s RENAME CONSTRAINT %I TO %I', v_old, v_table || '_pkey', v_table || '_0_pkey');
        FOR v_name IN
            SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
            WHERE i.indrelid = v_old AND c.relname <> v_table || '_0_pkey' LOOP
            EXECUTE format('ALTER INDEX marketing.%I RENAME TO %I', v_name,
                           v_table || '_0_' || substr(v_name, length(v_table) + 2));
        END LOOP;
        EXECUTE format('ALTER TABLE %s RENAME TO %I', v_old, v_table || '_0');
    END LOOP;
END
$partitions$;

-- The table CREATE EXTENSION makes (sql/003_events.sql), with the sequence
-- where it was.
CREATE TABLE marketing.pipeline_events (
    id              bigint GENERATED ALWAYS AS IDENTITY,
    event_type      pipeline.event_type NOT NULL,
    payload         jsonb NOT NULL,
    status          pipeline.event_status NOT NULL DEFAULT 'pending',
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now(),
    processed_at    timestamptz,
    last_error      text,
    source_table    text,
    source_op       pipeline.event_source_op,
    source_key      jsonb,
    replay_count    integer NOT NULL DEFAULT 0,
    claimed_by      text,
    CONSTRAINT processed_at_iff_processed CHECK ((status = 'processed') = (processed_at IS NOT NULL))
) PARTITION BY RANGE (id);
SELECT setval(pg_get_serial_sequence('marketing.pipeline_events', 'id'),
              current_setting('pipeline_upgrade.pipeline_events_next_id')::bigint, false);


COMMENT ON TABLE marketing.pipeline_events IS
    'The event queue: one row per stage change (or pipeline.emit call), delivered to the webhook of its event_type.';

COMMENT ON COLUMN marketing.pipeline_events.event_type IS 'Lower-case identifier (a-z, 0-9, _; at most 47 characters).';

COMMENT ON COLUMN marketing.pipeline_events.payload IS
    'Row data: {"new": row} for INSERT, {"new": row, "old": row} for UPDATE, {"old": row} for DELETE; '
    'grouped events hold {"key": ..., "count": n, "new": [rows]}.';

COMMENT ON COLUMN marketing.pipeline_events.status IS 'pending, processing, processed, failed (will be retried) or dead (gave up).';

COMMENT ON COLUMN marketing.pipeline_events.attempts IS 'Delivery attempts since the event was created or last replayed.';

COMMENT ON COLUMN marketing.pipeline_events.next_attempt_at IS
    'pending/failed: earliest next delivery attempt. processing: end of the lease, after which the event is claimed again.';

COMMENT ON COLUMN marketing.pipeline_events.processed_at IS 'When delivery succeeded.';

COMMENT ON COLUMN marketing.pipeline_events.last_error IS 'Error of the latest failed attempt.';

COMMENT ON COLUMN marketing.pipeline_events.source_table IS 'schema.table whose change produced the event.';

COMMENT ON COLUMN marketing.pipeline_events.source_op IS 'INSERT, UPDATE, DELETE, or EMIT for pipeline.emit.';

COMMENT ON COLUMN marketing.pipeline_events.source_key IS 'Primary key of the changed row (or the group key of a grouped event), as JSON.';

COMMENT ON COLUMN marketing.pipeline_events.replay_count IS 'How many times the event was replayed.';

COMMENT ON COLUMN marketing.pipeline_events.claimed_by IS
    'While processing: the consumer that claimed it, when it gave a name (the worker does), so that it can take its claims back after a crash.';


COMMENT ON TABLE marketing.pipeline_error_log IS
    'Failures of the pipeline: failed deliveries and errors reported by receivers (pipeline.log_error).';

COMMENT ON COLUMN marketing.pipeline_error_log.stage IS 'Event type of the failed event, or the stage name a receiver reported.';

COMMENT ON COLUMN marketing.pipeline_error_log.event_id IS
    'The event the failure is about, if any; retention may have deleted it since.';

COMMENT ON COLUMN marketing.pipeline_error_log.details IS 'Structured context: attempt, status code, response excerpt, ...';


-- ==== from sql/004_capture.sql ====

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

COMMENT ON TABLE pipeline.watches IS
    'Table changes that become events, one row per pipeline.watch call. builtin marks the seven stage watches.';


-- The tables of the pipeline itself: an event about them would feed itself.
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

COMMENT ON TABLE pipeline.stages IS
    'The seven stages of the outreach pipeline and the watch that emits each stage''s event.';


-- The stages are configuration, not secrets: whoever registers a webhook
-- or reads the funnel may look at them.
GRANT SELECT ON pipeline.stages TO PUBLIC;


-- ==== from sql/006_queue.sql ====

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
-- They also run with jit off: a plan node the settings disable but that has
-- no alternative (a sequential scan of pipeline.deliverers) costs 10^10,
-- far above jit_above_cost, and PostgreSQL then compiled that statement
-- with LLVM at every execution: tens of milliseconds each time, and about
-- 25 MB that LLVM kept in the deliverer's process.

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
-- the ids claimed, their attempt and their payload's size.
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


-- The error log's checks (dropped with the functions they call).
ALTER TABLE marketing.pipeline_error_log
    ADD CONSTRAINT stage_not_blank CHECK (NOT pipeline._is_blank(stage)),
    ADD CONSTRAINT error_message_not_blank CHECK (NOT pipeline._is_blank(error_message));

-- ==== from sql/007_errors.sql ====

-- 007_errors.sql: reporting, resolving and watching errors.
--
-- Delivery failures are logged by pipeline.mark_failed. Receivers report their
-- own failures (a validation API down, an enrichment quota hit) with
-- pipeline.log_error, so one log shows every stage.

-- Logging an error of a stage (and, when known, of an event).
CREATE FUNCTION pipeline.log_error(
    stage    text,
    error    text,
    event_id bigint DEFAULT NULL,
    details  jsonb DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_id bigint;
BEGIN
    IF stage IS NULL OR pipeline._is_blank(stage) THEN
        RAISE EXCEPTION 'pipeline.log_error: stage must name the stage or event type that failed'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF error IS NULL OR pipeline._is_blank(error) THEN
        RAISE EXCEPTION 'pipeline.log_error: error must describe the failure'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF event_id IS NOT NULL THEN
        PERFORM pipeline._require_events(ARRAY[event_id]);
    END IF;
    INSERT INTO marketing.pipeline_error_log (stage, event_id, error_message, details)
    VALUES (stage, event_id, error, coalesce(details, '{}'))
    RETURNING id INTO v_id;
    RETURN v_id;
END
$$;

COMMENT ON FUNCTION pipeline.log_error(text, text, bigint, jsonb) IS
    'Adds an error to marketing.pipeline_error_log; returns its id.';


-- Marking one error resolved.
CREATE FUNCTION pipeline.resolve_error(error_id bigint, note text DEFAULT NULL) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE marketing.pipeline_error_log l
    SET resolved = true, resolved_at = now(), resolution_note = note
    WHERE l.id = error_id AND NOT l.resolved;
    IF FOUND THEN
        RETURN true;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM marketing.pipeline_error_log l WHERE l.id = error_id) THEN
        RAISE EXCEPTION 'no error with id %', coalesce(error_id::text, 'NULL')
            USING ERRCODE = 'no_data_found';
    END IF;
    RETURN false;
END
$$;

COMMENT ON FUNCTION pipeline.resolve_error(bigint, text) IS
    'Marks an error resolved; false when it already was.';


-- Marking many errors resolved: those of a stage and/or an event, up to a time.
CREATE FUNCTION pipeline.resolve_errors(
    stage    text DEFAULT NULL,
    event_id bigint DEFAULT NULL,
    before   timestamptz DEFAULT NULL,
    note     text DEFAULT NULL
) RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_count integer;
BEGIN
    UPDATE marketing.pipeline_error_log l
    SET resolved = true, resolved_at = now(), resolution_note = note
    WHERE NOT l.resolved
      AND (resolve_errors.stage IS NULL OR l.stage = resolve_errors.stage)
      AND (resolve_errors.event_id IS NULL OR l.event_id = resolve_errors.event_id)
      AND l.created_at <= coalesce(before, now());
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END
$$;

COMMENT ON FUNCTION pipeline.resolve_errors(text, bigint, timestamptz, text) IS
    'Marks every unresolved error of a stage and/or event, logged up to before (default now), resolved; returns how many.';


-- What a role that may not read the error log (pg_monitor) sees of an
-- error: what failed, where, when and with which status, but none of the
-- words of a receiver or a service (an answer may echo the request's
-- payload; a stage's own report may quote a company). Whoever may read the
-- error log reads them there, and in the view (docs/security.md).
CREATE FUNCTION pipeline._reads_error_text() RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT has_table_privilege('marketing.pipeline_error_log', 'SELECT')
$$;

-- An endpoint's URL as a role sees it: whole to roles that may read the
-- endpoints' credentials, else only its origin (a path or a query may be the
-- secret: Slack's and Discord's webhook URLs carry their token in the path).
-- NB: the table is named in a string, looked up when it runs (it is made
-- after this file's views).
CREATE FUNCTION pipeline._url_seen(url text) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN has_table_privilege('pipeline.webhook_credentials', 'SELECT') THEN url
                ELSE substring(url FROM '^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*') || '/...' END
$$;

-- An error as monitoring sees it: a delivery failure by its status (the
-- deliverer's own words when no answer came: a timeout, a refused
-- connection), a stage's report by nothing but that it was one.
CREATE FUNCTION pipeline._error_summary(error_message text, details jsonb) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE
        WHEN details ? 'status_code' THEN 'HTTP ' || (details ->> 'status_code')
        WHEN details ? 'outcome' THEN error_message
        ELSE 'reported by the stage (its words are in marketing.pipeline_error_log)'
    END
$$;

CREATE VIEW marketing.vw_unresolved_errors AS
SELECT l.id,
       l.stage,
       l.event_id,
       e.status AS event_status,
       e.attempts AS event_attempts,
       CASE WHEN r.full THEN l.error_message
            ELSE pipeline._error_summary(l.error_message, l.details) END AS error_message,
       CASE WHEN r.full THEN l.details
            ELSE jsonb_strip_nulls(jsonb_build_object('url', pipeline._url_seen(l.details ->> 'url'),
                                                      'status_code', l.details -> 'status_code',
                                                      'outcome', l.details -> 'outcome',
                                                      'attempt', l.details -> 'attempt',
                                                      'status', l.details -> 'status')) END AS details,
       l.created_at,
       now() - l.created_at AS age
FROM marketing.pipeline_error_log l
CROSS JOIN (SELECT pipeline._reads_error_text() AS full) r
LEFT JOIN marketing.pipeline_events e ON e.id = l.event_id
WHERE NOT l.resolved
ORDER BY l.created_at DESC, l.id DESC;

COMMENT ON VIEW marketing.vw_unresolved_errors IS
    'Unresolved errors, newest first, with the current state of their event. Roles that may not read '
    'marketing.pipeline_error_log (pg_monitor) see the status of a failure but not what a receiver said.';


-- Error rate per stage over the last 24 hours: errors logged against events
-- created (of that type) in the same window.
CREATE VIEW marketing.vw_error_rate_24h AS
WITH errors AS (
    SELECT l.stage,
           count(*) AS errors,
           count(*) FILTER (WHERE NOT l.resolved) AS unresolved,
           count(DISTINCT l.event_id) AS failed_events,
           max(l.created_at) AS last_error_at
    FROM marketing.pipeline_error_log l
    WHERE l.created_at > now() - interval '24 hours'
    GROUP BY l.stage
), events AS (
    SELECT e.event_type AS stage, count(*) AS events
    FROM marketing.pipeline_events e
    WHERE e.created_at > now() - interval '24 hours'
    GROUP BY e.event_type
)
SELECT coalesce(er.stage, ev.stage) AS stage,
       coalesce(ev.events, 0) AS events,
       coalesce(er.errors, 0) AS errors,
       coalesce(er.unresolved, 0) AS unresolved,
       coalesce(er.failed_events, 0) AS failed_events,
       CASE WHEN coalesce(ev.events, 0) = 0 THEN NULL
            ELSE round(100.0 * coalesce(er.failed_events, 0) / ev.events, 2) END AS failed_event_pct,
       er.last_error_at
FROM errors er
FULL JOIN events ev ON ev.stage = er.stage
ORDER BY errors DESC, stage;

COMMENT ON VIEW marketing.vw_error_rate_24h IS
    'Per stage, last 24 hours: events created, errors logged, unresolved errors, events with errors and their share.';


-- ==== from sql/008_views.sql ====

-- 008_views.sql: stage 7 and the monitoring views.

-- Stage 7: contacts whose newest email verification is valid.
CREATE VIEW marketing.vw_outreach_ready AS
SELECT s.id AS slot_id,
       c.id AS company_id,
       c.company_name,
       c.website,
       c.domain,
       s.slot_role,
       s.full_name,
       s.title,
       v.email,
       v.score AS email_score,
       v.verified_at
FROM marketing.company_slots s
JOIN marketing.company_master c ON c.id = s.company_id
JOIN LATERAL (
    SELECT ev.email, ev.result, ev.score, ev.verified_at
    FROM marketing.email_verification ev
    WHERE ev.slot_id = s.id
    ORDER BY ev.verified_at DESC, ev.id DESC
    LIMIT 1
) v ON true
WHERE v.result = 'valid';

COMMENT ON VIEW marketing.vw_outreach_ready IS
    'Stage 7: contacts whose newest email verification is valid, with their company: ready for outreach.';


-- Events waiting for delivery, by type.
CREATE VIEW marketing.vw_pending_events AS
SELECT e.event_type,
       count(*) FILTER (WHERE e.status = 'pending') AS pending,
       count(*) FILTER (WHERE e.status = 'processing') AS processing,
       count(*) FILTER (WHERE e.status = 'failed') AS failed,
       count(*) FILTER (WHERE e.status <> 'processing' AND e.next_attempt_at <= now()) AS due_now,
       min(e.created_at) AS oldest_created_at,
       now() - min(e.created_at) AS oldest_age
FROM marketing.pipeline_events e
WHERE e.status IN ('pending', 'failed', 'processing')
GROUP BY e.event_type
ORDER BY e.event_type;

COMMENT ON VIEW marketing.vw_pending_events IS
    'Events not yet delivered (pending, processing, failed awaiting retry) by type, with the age of the oldest.';


-- Time from an event's creation to its delivery, by type, over the last 24 hours.
CREATE VIEW marketing.vw_processing_latency AS
SELECT e.event_type,
       count(*) AS delivered,
       round(avg(ms)::numeric, 1) AS avg_ms,
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 1) AS p50_ms,
       round(percentile_cont(0.95) WITHIN GROUP (ORDER BY ms)::numeric, 1) AS p95_ms,
       round(max(ms)::numeric, 1) AS max_ms
FROM marketing.pipeline_events e
CROSS JOIN LATERAL (SELECT extract(epoch FROM e.processed_at - e.created_at) * 1000 AS ms) AS l
-- NB: an event of a type recorded without delivery is settled as processed
-- at its creation (pipeline.undelivered_types): it was not delivered.
WHERE e.status = 'processed' AND e.processed_at > now() - interval '24 hours' AND e.processed_at > e.created_at
GROUP BY e.event_type
ORDER BY e.event_type;

COMMENT ON VIEW marketing.vw_processing_latency IS
    'Delivered events of the last 24 hours by type: count and processed_at - created_at in ms (avg, p50, p95, max).';


-- ==== from sql/009_stage_work.sql ====

-- 009_stage_work.sql: the work of the stages that decide something, as
-- functions the receivers call (the n8n workflows of n8n/workflows and
-- examples/stage_runner.rs), so that the rules live here, beside the
-- constraints they must agree with, and not in each receiver.
--
--   pipeline.validate_company(intake_id)   stage 2: valid or invalid, with reasons
--   pipeline.promote_company(intake_id)    stage 3: into marketing.company_master
--   pipeline.create_slots(company_id)      stage 4: the role slots of a company
--   pipeline.record_enrichment(slot, items)    stage 5: a people-finder's (Apify) answer
--   pipeline.record_verification(slot, answer) stage 6: an email verifier's (MillionVerifier) answer
--
-- Each may be called again for the same row (deliveries are at least once):
-- a second call changes nothing and answers as the first did. What cannot be
-- done raises an error whose message says why, in words a person can act
-- on; a receiver passes it back, and it ends in marketing.pipeline_error_log.
-- They run with the rights of their caller (no SECURITY DEFINER): the
-- receiver's role needs the table rights the work takes (docs/security.md).

-- What is wrong with a website, in words, or NULL when the pipeline can use
-- it: when pipeline.website_url reads it as a URL the rule of
-- marketing.company_master's CHECK (pipeline._is_http_url) accepts, and its
-- host has a dot and no empty label. The reasons only name what failed.
CREATE FUNCTION pipeline.website_problem(website text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE
        WHEN pipeline._is_http_url(pipeline.website_url(website))
             AND pipeline.website_domain(website) ~ '^[^.]+(\.[^.]+)+$' THEN NULL
        WHEN website IS NULL OR pipeline._is_blank(website) THEN 'website is missing'
        WHEN char_length(website) > 2048 THEN 'website is longer than 2048 characters'
        WHEN pipeline.website_url(website) !~* '^https?://' THEN 'website is not an http(s) URL or a domain name'
        WHEN pipeline.website_url(website) ~ '\s' THEN 'website contains spaces'
        WHEN pipeline.website_url(website) ~* '^https?://[^/?#]*@' THEN 'website has a user name or password in it'
        WHEN pipeline.website_domain(website) IS NULL THEN 'website has no host'
        WHEN pipeline.website_domain(website) !~ '\.' THEN 'website host has no dot'
        WHEN pipeline.website_domain(website) ~ '(^|\.)(\.|$)' THEN 'website host has an empty label'
        ELSE 'website is not a valid http(s) URL'
    END
$$;
COMMENT ON FUNCTION pipeline.website_problem(text) IS
    'Why a website cannot be used (missing, not http(s) or a domain, host without a dot, ...), or NULL when it can. '
    'A bare domain is read as https://<domain> (pipeline.website_url).';

-- Looking for an earlier valid row of the same company stays an index scan.
CREATE INDEX company_raw_intake_valid_domain_idx ON intake.company_raw_intake (pipeline.website_domain(website))
    WHERE validation_status = 'valid';


-- Which domain is being decided: validate_company takes a row lock here, so
-- that the rows of one domain are decided one at a time. A table of the
-- pipeline's and not an advisory lock: any role can take any advisory lock
-- key, and so hold up the validation of a domain; a row here can be locked
-- only by roles that may validate (UPDATE on the intake table), as the
-- policy says. One row per domain ever validated.
CREATE TABLE pipeline.domain_locks (
    domain text PRIMARY KEY
);
COMMENT ON TABLE pipeline.domain_locks IS
    'Domains being validated: pipeline.validate_company locks a row here so that one domain is decided at a time.';
ALTER TABLE pipeline.domain_locks ENABLE ROW LEVEL SECURITY;
CREATE POLICY domain_locks_validators ON pipeline.domain_locks
    USING (has_column_privilege('intake.company_raw_intake'::regclass, 'validation_status', 'UPDATE'))
    WITH CHECK (has_column_privilege('intake.company_raw_intake'::regclass, 'validation_status', 'UPDATE'));
GRANT SELECT, INSERT, UPDATE ON pipeline.domain_locks TO PUBLIC;

-- A stage's decision is the stage's: a role that may only insert into a
-- stage table cannot insert a row already decided (an intake row marked
-- valid would be promoted without validation; a slot marked enriched
-- would skip enrichment). Deciding takes UPDATE on the column that says
-- the decision, as the stage functions have it; the owner has it.
-- NB: row triggers whose WHEN says "decided", so that an undecided row (all
-- of them, as a rule) costs the executor one test of its columns and calls
-- no function (as statement triggers over the new rows, they cost about
-- 1% of a single-row intake insert: docs/benchmark-notes.md, "Seventh pass").
CREATE FUNCTION pipeline._intake_arrives_pending() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT has_column_privilege(TG_RELID, 'validation_status', 'UPDATE') THEN
        RAISE EXCEPTION 'role % may not insert an intake row that is already validated', current_user
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'validated, validation_status, validation_errors and validated_at are set by validation '
                           '(pipeline.validate_company); a new row is pending.',
                  HINT = 'Leave those columns out, or grant UPDATE (validation_status) to a role that validates.';
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER intake_arrives_pending AFTER INSERT ON intake.company_raw_intake
    FOR EACH ROW
    WHEN (NEW.validation_status <> 'pending' OR NEW.validated
          OR cardinality(NEW.validation_errors) > 0 OR NEW.validated_at IS NOT NULL)
    EXECUTE FUNCTION pipeline._intake_arrives_pending();

CREATE FUNCTION pipeline._slots_arrive_pending() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT has_column_privilege(TG_RELID, 'enrichment_status', 'UPDATE') THEN
        RAISE EXCEPTION 'role % may not insert a slot that is already enriched', current_user
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'enrichment_status, enrichment_source and enriched_at are set by enrichment '
                           '(pipeline.record_enrichment); a new slot is pending.',
                  HINT = 'Leave those columns out, or grant UPDATE (enrichment_status) to a role that enriches.';
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER slots_arrive_pending AFTER INSERT ON marketing.company_slots
    FOR EACH ROW
    WHEN (NEW.enrichment_status <> 'pending' OR NEW.enriched_at IS NOT NULL OR NEW.enrichment_source IS NOT NULL)
    EXECUTE FUNCTION pipeline._slots_arrive_pending();

-- Stage 2. Decides a pending intake row: valid when its website is usable
-- and no other company has its domain; invalid otherwise, with every reason.
-- A row already decided is answered as it is. A duplicate is rejected with
-- the row it duplicates (promoted company or earlier valid intake row),
-- never dropped: promotion keeps one company per domain.
CREATE FUNCTION pipeline.validate_company(intake_id bigint)
RETURNS TABLE (id bigint, validation_status text, validation_errors text[], domain text)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_row     intake.company_raw_intake;
    v_errors  text[] := '{}';
    v_domain  text;
    v_problem text;
    v_other   bigint;
BEGIN
    IF validate_company.intake_id IS NULL THEN
        RAISE EXCEPTION 'pipeline.validate_company: intake_id must not be NULL'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT * INTO v_row FROM intake.company_raw_intake r WHERE r.id = validate_company.intake_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pipeline.validate_company: intake row % does not exist', validate_company.intake_id
            USING ERRCODE = 'no_data_found';
    END IF;
    v_domain := pipeline.website_domain(v_row.website);
    IF v_row.validation_status <> 'pending' THEN
        RETURN QUERY SELECT v_row.id, v_row.validation_status, v_row.validation_errors, v_domain;
        RETURN;
    END IF;

    v_problem := pipeline.website_problem(v_row.website);
    IF v_problem IS NOT NULL THEN
        v_errors := v_errors || v_problem;
        v_domain := NULL;
    ELSE
        -- One decision per domain at a time: two rows of one company
        -- validated at once would otherwise both pass (see domain_locks).
        -- NB: by the constraint's name: "domain" is also this function's output.
        INSERT INTO pipeline.domain_locks AS l (domain) VALUES (v_domain)
        ON CONFLICT ON CONSTRAINT domain_locks_pkey DO UPDATE SET domain = excluded.domain;
        SELECT m.id INTO v_other FROM marketing.company_master m WHERE m.domain = v_domain;
        IF FOUND THEN
            v_errors := v_errors || format('duplicate: %s is already promoted (company_master id %s)', v_domain, v_other);
        ELSE
            SELECT r.id INTO v_other FROM intake.company_raw_intake r
            WHERE pipeline.website_domain(r.website) = v_domain AND r.validation_status = 'valid' AND r.id <> v_row.id
            ORDER BY r.id LIMIT 1;
            IF FOUND THEN
                v_errors := v_errors || format('duplicate: %s is the domain of intake row %s, already valid', v_domain, v_other);
            END IF;
        END IF;
    END IF;

    UPDATE intake.company_raw_intake r
    SET validated = cardinality(v_errors) = 0,
        validation_status = CASE WHEN cardinality(v_errors) = 0 THEN 'valid' ELSE 'invalid' END,
        validation_errors = v_errors,
        validated_at = now()
    WHERE r.id = v_row.id;
    RETURN QUERY SELECT v_row.id, CASE WHEN cardinality(v_errors) = 0 THEN 'valid' ELSE 'invalid' END, v_errors, v_domain;
END
$$;

COMMENT ON FUNCTION pipeline.validate_company(bigint) IS
    'Stage 2: marks a pending intake row valid or invalid with its reasons (website rules, duplicate domains); '
    'returns the outcome. A row already decided is returned unchanged.';


-- Stage 3. Copies a valid intake row into marketing.company_master and
-- returns the company's id; the same id again when it is there already.
CREATE FUNCTION pipeline.promote_company(intake_id bigint) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_row   intake.company_raw_intake;
    v_id    bigint;
    v_other marketing.company_master;
BEGIN
    SELECT * INTO v_row FROM intake.company_raw_intake r WHERE r.id = promote_company.intake_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pipeline.promote_company: intake row % does not exist', promote_company.intake_id
            USING ERRCODE = 'no_data_found';
    END IF;
    SELECT m.id INTO v_id FROM marketing.company_master m WHERE m.intake_id = v_row.id;
    IF FOUND THEN
        RETURN v_id;
    END IF;
    IF NOT v_row.validated THEN
        RAISE EXCEPTION 'pipeline.promote_company: intake row % is not valid (validation_status %)',
                        v_row.id, v_row.validation_status
            USING ERRCODE = 'check_violation',
                  HINT = 'Only rows that pipeline.validate_company accepted are promoted.';
    END IF;
    INSERT INTO marketing.company_master AS m (intake_id, company_name, website, industry, employee_count,
                                               city, state, country, linkedin_url)
    VALUES (v_row.id, v_row.company, pipeline.website_url(v_row.website), v_row.industry, v_row.employee_count,
            v_row.city, v_row.state, v_row.country, v_row.linkedin_url)
    ON CONFLICT (domain) DO NOTHING
    RETURNING m.id INTO v_id;
    IF v_id IS NULL THEN
        -- The same row, promoted by a delivery of the same event at once.
        SELECT m.id INTO v_id FROM marketing.company_master m WHERE m.intake_id = v_row.id;
        IF FOUND THEN
            RETURN v_id;
        END IF;
        SELECT * INTO v_other FROM marketing.company_master m WHERE m.domain = pipeline.website_domain(v_row.website);
        RAISE EXCEPTION 'pipeline.promote_company: intake row % has the domain %, already promoted as company_master id % (from intake row %)',
                        v_row.id, v_other.domain, v_other.id, coalesce(v_other.intake_id::text, 'none')
            USING ERRCODE = 'unique_violation';
    END IF;
    RETURN v_id;
END
$$;

COMMENT ON FUNCTION pipeline.promote_company(bigint) IS
    'Stage 3: copies a valid intake row into marketing.company_master; returns the company id (the same one when called again).';


-- Stage 4. The role slots of a promoted company (default: ceo and cfo);
-- returns how many were created now (0 when they were all there).
CREATE FUNCTION pipeline.create_slots(company_id bigint, roles text[] DEFAULT '{ceo,cfo}') RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_count integer;
BEGIN
    PERFORM FROM marketing.company_master m WHERE m.id = create_slots.company_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pipeline.create_slots: company_master id % does not exist', create_slots.company_id
            USING ERRCODE = 'no_data_found';
    END IF;
    IF roles IS NULL OR cardinality(roles) = 0 THEN
        RAISE EXCEPTION 'pipeline.create_slots: roles must name at least one role'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO marketing.company_slots AS s (company_id, slot_role)
    SELECT create_slots.company_id, r FROM unnest(roles) WITH ORDINALITY AS u(r, n) ORDER BY n
    ON CONFLICT ON CONSTRAINT company_slots_company_role_key DO NOTHING;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END
$$;

COMMENT ON FUNCTION pipeline.create_slots(bigint, text[]) IS
    'Stage 4: creates the role slots (default ceo, cfo) of a company that lack; returns how many were created.';


-- The first non-empty field of an item among names (a JSON array of field
-- names, in order of preference), trimmed.
CREATE FUNCTION pipeline._first_field(item jsonb, names jsonb) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
    SELECT v FROM jsonb_array_elements_text(CASE jsonb_typeof(names) WHEN 'array' THEN names ELSE '[]' END)
                  WITH ORDINALITY AS k(name, n)
    CROSS JOIN LATERAL (SELECT nullif(btrim(CASE jsonb_typeof(item -> k.name)
                                                WHEN 'string' THEN item ->> k.name
                                                WHEN 'number' THEN item ->> k.name END), '') AS v) f
    WHERE v IS NOT NULL
    ORDER BY n LIMIT 1
$$;

-- Stage 5. Fills a slot from what a people-finder returned: `items` is the
-- JSON array of dataset items of an Apify actor run
-- (run-sync-get-dataset-items), one person per item. Which item field fills
-- which column is pipeline.services_in_effect.fields (the apify row: the
-- one place to change, with pipeline.set_service, when another actor is
-- used). The first item with a name or a
-- usable email fills the slot (enriched, source `source`); an email the
-- table would refuse is left out. No such item: the slot is not_found. A
-- slot already decided is left as it is; returns the slot's
-- enrichment_status. Recording ends the slot's call (pipeline.service_calls).
CREATE FUNCTION pipeline.record_enrichment(slot_id bigint, items jsonb, source text DEFAULT 'apify')
RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_slot   marketing.company_slots;
    v_fields jsonb;
    v_person jsonb;
    v_name   text;
    v_email  text;
BEGIN
    SELECT * INTO v_slot FROM marketing.company_slots s WHERE s.id = record_enrichment.slot_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pipeline.record_enrichment: slot % does not exist', record_enrichment.slot_id
            USING ERRCODE = 'no_data_found';
    END IF;
    IF jsonb_typeof(items) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'pipeline.record_enrichment: items must be the JSON array of the actor''s dataset items, not %',
                        coalesce(jsonb_typeof(items), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT s.fields INTO v_fields FROM pipeline.services_in_effect s WHERE s.service = 'apify';
    IF v_slot.enrichment_status IN ('enriched', 'not_found') THEN
        UPDATE pipeline.service_calls c SET leased_until = NULL, done_at = coalesce(c.done_at, now())
        WHERE c.stage = 'enrichment' AND c.slot_id = v_slot.id;
        RETURN v_slot.enrichment_status;
    END IF;
    SELECT p.person, p.name, p.email INTO v_person, v_name, v_email
    FROM (SELECT i.item AS person, i.n,
                 pipeline._first_field(i.item, v_fields -> 'full_name') AS name,
                 CASE WHEN pipeline._is_email(lower(pipeline._first_field(i.item, v_fields -> 'email')))
                      THEN lower(pipeline._first_field(i.item, v_fields -> 'email')) END AS email
          FROM jsonb_array_elements(items) WITH ORDINALITY AS i(item, n)
          WHERE jsonb_typeof(i.item) = 'object') p
    WHERE p.name IS NOT NULL OR p.email IS NOT NULL
    ORDER BY p.n
    LIMIT 1;
    IF v_person IS NULL THEN
        UPDATE marketing.company_slots s
        SET enrichment_status = 'not_found', enrichment_source = record_enrichment.source, enriched_at = now()
        WHERE s.id = v_slot.id;
    ELSE
        UPDATE marketing.company_slots s
        SET enrichment_status = 'enriched', enrichment_source = record_enrichment.source, enriched_at = now(),
            full_name = left(v_name, 200),
            title = left(pipeline._first_field(v_person, v_fields -> 'title'), 200),
            email = v_email,
            linkedin_url = left(pipeline._first_field(v_person, v_fields -> 'linkedin_url'), 2048),
            phone = left(pipeline._first_field(v_person, v_fields -> 'phone'), 50)
        WHERE s.id = v_slot.id;
    END IF;
    UPDATE pipeline.service_calls c SET leased_until = NULL, done_at = now()
    WHERE c.stage = 'enrichment' AND c.slot_id = v_slot.id;
    RETURN CASE WHEN v_person IS NULL THEN 'not_found' ELSE 'enriched' END;
END
$$;
COMMENT ON FUNCTION pipeline.record_enrichment(bigint, jsonb, text) IS
    'Stage 5: fills a slot from an Apify actor''s dataset items (the first person with a name or email, fields '
    'mapped by pipeline.services_in_effect), or marks it not_found; a slot already decided is left as it is. Returns the '
    'enrichment_status.';

-- Stage 6. Stores a MillionVerifier answer (GET /api/v3/?api=...&email=...)
-- for a slot's email: result ok → valid, catch_all → catch_all, unknown →
-- unknown, invalid and disposable → invalid; score from quality (good 90,
-- risky 50, bad 10); the whole answer in details. MillionVerifier answers a
-- bad key or an empty balance with HTTP 200 and result "error": that is
-- raised with its message, so the event is retried and the error log says
-- why. The same verdict twice (credits and executiontime aside) is stored
-- once; returns the verification's id.
CREATE FUNCTION pipeline.record_verification(slot_id bigint, answer jsonb, provider text DEFAULT 'millionverifier')
RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_slot   marketing.company_slots;
    v_result text;
    v_id     bigint;
BEGIN
    SELECT * INTO v_slot FROM marketing.company_slots s WHERE s.id = record_verification.slot_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pipeline.record_verification: slot % does not exist', record_verification.slot_id
            USING ERRCODE = 'no_data_found';
    END IF;
    IF v_slot.email IS NULL THEN
        RAISE EXCEPTION 'pipeline.record_verification: slot % has no email to verify', v_slot.id
            USING ERRCODE = 'no_data_found';
    END IF;
    IF jsonb_typeof(answer) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'pipeline.record_verification: the answer must be a JSON object, not %',
                        coalesce(jsonb_typeof(answer), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF answer ->> 'result' = 'error' OR coalesce(answer ->> 'error', '') <> '' THEN
        RAISE EXCEPTION '%: %', provider, coalesce(nullif(answer ->> 'error', ''), 'error without a message')
            USING ERRCODE = 'external_routine_exception',
                  DETAIL = format('resultcode %s, credits %s', coalesce(answer ->> 'resultcode', '?'),
                                  coalesce(answer ->> 'credits', '?'));
    END IF;
    IF lower(answer ->> 'email') IS DISTINCT FROM lower(v_slot.email) THEN
        RAISE EXCEPTION 'pipeline.record_verification: the answer is about %, slot % has %',
                        coalesce(answer ->> 'email', 'no email'), v_slot.id, v_slot.email
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_result := CASE answer ->> 'result'
                    WHEN 'ok' THEN 'valid'
                    WHEN 'catch_all' THEN 'catch_all'
                    WHEN 'unknown' THEN 'unknown'
                    WHEN 'invalid' THEN 'invalid'
                    WHEN 'disposable' THEN 'invalid'
                END;
    IF v_result IS NULL THEN
        RAISE EXCEPTION 'pipeline.record_verification: unknown result % (expected ok, catch_all, unknown, invalid, disposable or error)',
                        coalesce(answer -> 'result', 'null'::jsonb)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- The same verdict again (a retried delivery, a late receiver) is the
    -- same verification, whatever its credits or execution time say.
    SELECT v.id INTO v_id FROM marketing.email_verification v
    WHERE v.slot_id = v_slot.id AND v.email = v_slot.email AND v.provider = record_verification.provider
      AND v.details - '{credits,executiontime}'::text[] = answer - '{credits,executiontime}'::text[]
    ORDER BY v.id DESC LIMIT 1;
    IF NOT FOUND THEN
        INSERT INTO marketing.email_verification AS v (slot_id, email, result, provider, score, details)
        VALUES (v_slot.id, v_slot.email, v_result, record_verification.provider,
                CASE answer ->> 'quality' WHEN 'good' THEN 90 WHEN 'risky' THEN 50 WHEN 'bad' THEN 10 END,
                answer)
        RETURNING v.id INTO v_id;
    END IF;
    UPDATE pipeline.service_calls c SET leased_until = NULL, done_at = now()
    WHERE c.stage = 'verification' AND c.slot_id = v_slot.id;
    RETURN v_id;
END
$$;

COMMENT ON FUNCTION pipeline.record_verification(bigint, jsonb, text) IS
    'Stage 6: stores a MillionVerifier answer for a slot''s email (result, score from quality, the answer as details); '
    'raises the provider''s error (bad key, no credits) so the event is retried. Returns the verification id.';


-- ==== from sql/010_service_calls.sql (new in 0.2.0) ====

-- 010_service_calls.sql: the calls the stage work makes to outside services
-- (Apify for enrichment, MillionVerifier for verification), so that a
-- delivery answers 2xx only when all of its work is recorded, and a retry
-- redoes only what is undone, without paying twice.
--
-- A receiver (an n8n workflow, examples/stage_runner.rs) does, for the slots
-- of one event:
--
--   SELECT * FROM pipeline.enrichment_calls(slot_ids)     -- or verification_calls
--       each slot: 'call' (with the request to send), 'done', 'busy', 'missing'
--   ... sends each 'call' request, with its own key ...
--   SELECT * FROM pipeline.finish_call(stage, slot, http_status, body, retry_after_header, error)
--       records what the service answered: the slot filled, or the failure
--       with the HTTP status the delivery should answer
--   SELECT * FROM pipeline.stage_answer(stage, slot_ids)
--       the one answer for the delivery, from what is recorded: 200 when every part is,
--       else the failing service's meaning (429 with Retry-After, 503/504,
--       424 for a key or credits the service refuses, 409 while another
--       delivery calls, 422 for input no retry can fix)
--
-- Which service, actor, input and field mapping is configuration, in one
-- place: pipeline.services_in_effect, the defaults with what
-- pipeline.set_service changed (the keys are not: they stay with the
-- receiver, n8n credentials or environment variables).

-- Where the services are and how they are called: the defaults below,
-- changed by a row here (pipeline.set_service), whose non-NULL columns win.
-- Only the pipeline's owner may change it: a receiver sends its key to the
-- base_url it says. Empty at install, so that pg_dump carries exactly what
-- was changed and a restore, after CREATE EXTENSION, adds it without a
-- conflict.
CREATE TABLE pipeline.services (
    service        text PRIMARY KEY,
    base_url       text,
    actor          text,
    input          jsonb,
    role_titles    jsonb,
    fields         jsonb,
    max_items      integer,
    call_timeout_s integer,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT service_known CHECK (service IN ('apify', 'millionverifier')),
    CONSTRAINT base_url_is_http_url CHECK (base_url ~ '^https?://[^\s/?#@]+$'),
    CONSTRAINT actor_is_username_tilde_name CHECK (
        actor IS NULL OR (service = 'apify' AND actor ~ '^[A-Za-z0-9._-]+~[A-Za-z0-9._-]+$')),
    CONSTRAINT input_is_object_with_domain CHECK (
        input IS NULL OR (service = 'apify' AND jsonb_typeof(input) = 'object' AND strpos(input::text, '"{domain}"') > 0)),
    CONSTRAINT role_titles_is_object_of_arrays CHECK (
        role_titles IS NULL OR (service = 'apify' AND jsonb_typeof(role_titles) = 'object'
                                AND NOT jsonb_path_exists(role_titles, '$.* ? (@.type() != "array")'))),
    CONSTRAINT fields_names_slot_columns CHECK (
        fields IS NULL OR (service = 'apify' AND jsonb_typeof(fields) = 'object'
                           AND fields ?& ARRAY['full_name', 'email']
                           AND NOT fields ?| ARRAY['id', 'company_id', 'slot_role', 'enrichment_status',
                                                   'enrichment_source', 'enriched_at', 'created_at'])),
    CONSTRAINT max_items_between_1_and_100 CHECK (max_items IS NULL OR (service = 'apify' AND max_items BETWEEN 1 AND 100)),
    CONSTRAINT call_timeout_s_range CHECK (
        call_timeout_s BETWEEN 2 AND CASE service WHEN 'millionverifier' THEN 60 ELSE 3600 END)
);
COMMENT ON TABLE pipeline.services IS
    'Changes to the outside services'' defaults (pipeline.services_in_effect shows the result): base URL, and for '
    'Apify the actor, its input (with "{domain}", "{role}" and "{titles}" placeholders), the job titles searched per '
    'slot role, and which item fields fill which slot column. NULL keeps the default. Keys are not here: they stay '
    'with the receiver.';
COMMENT ON COLUMN pipeline.services.call_timeout_s IS
    'Apify: the actor run''s own timeout (?timeout=, below run-sync''s 300 s); MillionVerifier: its timeout '
    'parameter (2-60 s).';
COMMENT ON COLUMN pipeline.services.fields IS
    'Slot column -> the dataset item fields that fill it, the first non-empty one wins '
    '(full_name, title, email, linkedin_url, phone).';
GRANT SELECT ON pipeline.services TO PUBLIC;

-- What the stage work uses: each service's defaults, with what
-- pipeline.services changes. The actor: Leads Finder
-- (apify.com/code_crafter/leads-finder), a public Apify Store actor that
-- finds the people of a company by its domain and their job title (its
-- documented input: company_domain, contact_job_title, fetch_count; each
-- dataset item is a person with full_name, first_name, last_name,
-- job_title, email, linkedin, mobile_number, company_domain, ...).
-- n8n/README.md says how to use another actor.
CREATE VIEW pipeline.services_in_effect AS
SELECT d.service,
       coalesce(s.base_url, d.base_url) AS base_url,
       coalesce(s.actor, d.actor) AS actor,
       coalesce(s.input, d.input) AS input,
       coalesce(s.role_titles, d.role_titles) AS role_titles,
       coalesce(s.fields, d.fields) AS fields,
       coalesce(s.max_items, d.max_items) AS max_items,
       coalesce(s.call_timeout_s, d.call_timeout_s) AS call_timeout_s,
       s.updated_at AS changed_at
FROM (VALUES
        ('apify', 'https://api.apify.com', 'code_crafter~leads-finder',
         '{"company_domain": ["{domain}"], "contact_job_title": "{titles}", "fetch_count": 1}'::jsonb,
         '{"ceo": ["CEO", "Chief Executive Officer", "Founder"], "cfo": ["CFO", "Chief Financial Officer"]}'::jsonb,
         '{"full_name": ["full_name", "fullName", "name"], "title": ["job_title", "jobTitle", "title", "position"],
           "email": ["email"], "linkedin_url": ["linkedin", "linkedinUrl", "linkedin_url"],
           "phone": ["mobile_number", "phone"]}'::jsonb,
         1, 240),
        ('millionverifier', 'https://api.millionverifier.com', NULL, NULL, NULL, NULL, NULL, 20)
     ) AS d(service, base_url, actor, input, role_titles, fields, max_items, call_timeout_s)
LEFT JOIN pipeline.services s ON s.service = d.service;
COMMENT ON VIEW pipeline.services_in_effect IS
    'Each outside service as the stage work calls it: its defaults with what pipeline.services changes '
    '(changed_at: when, NULL for the defaults).';
GRANT SELECT ON pipeline.services_in_effect TO PUBLIC;

-- Changing a service (the pipeline's owner): NULL keeps what is in effect;
-- reset => true goes back to the defaults. Refused values name the field
-- (the table's constraints). Returns the service as it is now in effect.
CREATE FUNCTION pipeline.set_service(
    service        text,
    base_url       text DEFAULT NULL,
    actor          text DEFAULT NULL,
    input          jsonb DEFAULT NULL,
    role_titles    jsonb DEFAULT NULL,
    fields         jsonb DEFAULT NULL,
    max_items      integer DEFAULT NULL,
    call_timeout_s integer DEFAULT NULL,
    reset          boolean DEFAULT false
) RETURNS pipeline.services_in_effect
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_now pipeline.services_in_effect;
BEGIN
    IF reset THEN
        DELETE FROM pipeline.services s WHERE s.service = set_service.service;
    END IF;
    INSERT INTO pipeline.services AS s (service, base_url, actor, input, role_titles, fields, max_items, call_timeout_s)
    VALUES (set_service.service, set_service.base_url, set_service.actor, set_service.input, set_service.role_titles,
            set_service.fields, set_service.max_items, set_service.call_timeout_s)
    ON CONFLICT ON CONSTRAINT services_pkey DO UPDATE
    SET base_url = coalesce(excluded.base_url, s.base_url), actor = coalesce(excluded.actor, s.actor),
        input = coalesce(excluded.input, s.input), role_titles = coalesce(excluded.role_titles, s.role_titles),
        fields = coalesce(excluded.fields, s.fields), max_items = coalesce(excluded.max_items, s.max_items),
        call_timeout_s = coalesce(excluded.call_timeout_s, s.call_timeout_s), updated_at = now();
    SELECT * INTO v_now FROM pipeline.services_in_effect e WHERE e.service = set_service.service;
    RETURN v_now;
END
$$;
COMMENT ON FUNCTION pipeline.set_service(text, text, text, jsonb, jsonb, jsonb, integer, integer, boolean) IS
    'Changes how an outside service is called (NULL keeps a field; reset => true goes back to the defaults); '
    'returns it as now in effect. For the pipeline''s owner.';

-- One row per slot and stage that a service was called for: the calls
-- started (each may be paid), the lease of the call in flight, and the last
-- failure, so that every part's failure stays visible (pipeline.stuck_work)
-- after the delivery that saw it.
CREATE TABLE pipeline.service_calls (
    stage        text NOT NULL,
    slot_id      bigint NOT NULL REFERENCES marketing.company_slots (id) ON DELETE CASCADE,
    subject      text NOT NULL,
    calls        integer NOT NULL DEFAULT 0,
    leased_until timestamptz,
    last_status  integer,
    last_error   text,
    failed_at    timestamptz,
    answer_status integer,
    retry_after_s integer,
    done_at      timestamptz,
    PRIMARY KEY (stage, slot_id),
    CONSTRAINT stage_known CHECK (stage IN ('enrichment', 'verification'))
);
COMMENT ON TABLE pipeline.service_calls IS
    'Per slot and stage: the service calls started, the one in flight (leased_until), the last failure '
    '(the service''s status and words, keys masked; what the delivery answers for it: answer_status, '
    'retry_after_s) and when the work was recorded.';
-- Who may do a stage's work may call for it: enrichment takes UPDATE on
-- the slots' enrichment_status, verification INSERT on email_verification.
ALTER TABLE pipeline.service_calls ENABLE ROW LEVEL SECURITY;
CREATE POLICY service_calls_stage_workers ON pipeline.service_calls
    USING (CASE stage
               WHEN 'enrichment' THEN has_column_privilege('marketing.company_slots'::regclass, 'enrichment_status', 'UPDATE')
               ELSE has_table_privilege('marketing.email_verification'::regclass, 'INSERT')
           END)
    WITH CHECK (CASE stage
                    WHEN 'enrichment' THEN has_column_privilege('marketing.company_slots'::regclass, 'enrichment_status', 'UPDATE')
                    ELSE has_table_privilege('marketing.email_verification'::regclass, 'INSERT')
                END);
GRANT SELECT, INSERT, UPDATE ON pipeline.service_calls TO PUBLIC;

-- A service's words with what could be a key masked: query parameters
-- (api=, token=, key=), bearer tokens. A receiver may pass a client's error
-- message that repeats the URL it called.
CREATE FUNCTION pipeline._mask_keys(message text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
    SELECT left(regexp_replace(regexp_replace(message,
                   '((?:api|apikey|api_key|token|key|access_token)=)[^&\s"'']+', '\1***', 'gi'),
               '(bearer\s+)[A-Za-z0-9._~+/=-]+', '\1***', 'gi'), 1000)
$$;

-- The slots' calls to make, and the lease of each: a slot that another
-- delivery is calling for is 'busy' until its lease ends (the call's
-- timeout and a margin), so concurrent or late deliveries of one event
-- never pay twice; a slot already recorded is 'done'.
CREATE FUNCTION pipeline._begin_call(stage text, slot_id bigint, subject text, lease interval)
RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_call pipeline.service_calls;
BEGIN
    INSERT INTO pipeline.service_calls AS c (stage, slot_id, subject)
    VALUES (_begin_call.stage, _begin_call.slot_id, _begin_call.subject)
    ON CONFLICT ON CONSTRAINT service_calls_pkey DO NOTHING;
    SELECT * INTO v_call FROM pipeline.service_calls c
    WHERE c.stage = _begin_call.stage AND c.slot_id = _begin_call.slot_id
    FOR UPDATE;
    IF v_call.leased_until > now() AND v_call.subject = _begin_call.subject THEN
        RETURN format('another delivery is calling for slot %s until %s', slot_id, v_call.leased_until);
    END IF;
    UPDATE pipeline.service_calls c
    SET calls = c.calls + 1, leased_until = now() + lease, subject = _begin_call.subject
    WHERE c.stage = _begin_call.stage AND c.slot_id = _begin_call.slot_id;
    RETURN NULL;
END
$$;

-- Stage 5's calls: for each slot of a slots_created event, the Apify
-- run-sync-get-dataset-items request to send (url, query, body), or why not.
CREATE FUNCTION pipeline.enrichment_calls(slot_ids bigint[])
RETURNS TABLE (slot_id bigint, action text, method text, url text, query jsonb, body jsonb, detail text)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_service pipeline.services_in_effect;
    v_id      bigint;
    v_slot    marketing.company_slots;
    v_domain  text;
    v_titles  jsonb;
    v_busy    text;
BEGIN
    SELECT * INTO v_service FROM pipeline.services_in_effect s WHERE s.service = 'apify';
    FOR v_id IN SELECT DISTINCT u.id FROM unnest(slot_ids) AS u(id) WHERE u.id IS NOT NULL ORDER BY u.id LOOP
        SELECT * INTO v_slot FROM marketing.company_slots s WHERE s.id = v_id FOR UPDATE;
        IF NOT FOUND THEN
            RETURN QUERY SELECT v_id, 'missing', NULL::text, NULL::text, NULL::jsonb, NULL::jsonb,
                                format('slot %s does not exist', v_id);
            CONTINUE;
        END IF;
        IF v_slot.enrichment_status IN ('enriched', 'not_found') THEN
            RETURN QUERY SELECT v_id, 'done', NULL::text, NULL::text, NULL::jsonb, NULL::jsonb,
                                format('slot %s is %s already', v_id, v_slot.enrichment_status);
            CONTINUE;
        END IF;
        SELECT c.domain INTO v_domain FROM marketing.company_master c WHERE c.id = v_slot.company_id;
        v_titles := coalesce(v_service.role_titles -> v_slot.slot_role, jsonb_build_array(upper(v_slot.slot_role)));
        v_busy := pipeline._begin_call('enrichment', v_id, v_domain || ' ' || v_slot.slot_role,
                                       make_interval(secs => least(v_service.call_timeout_s, 300) + 60));
        IF v_busy IS NOT NULL THEN
            RETURN QUERY SELECT v_id, 'busy', NULL::text, NULL::text, NULL::jsonb, NULL::jsonb, v_busy;
            CONTINUE;
        END IF;
        RETURN QUERY SELECT v_id, 'call', 'POST',
            format('%s/v2/acts/%s/run-sync-get-dataset-items', v_service.base_url, v_service.actor),
            jsonb_build_object('timeout', v_service.call_timeout_s::text, 'maxItems', v_service.max_items::text),
            replace(replace(replace(v_service.input::text,
                                    '"{domain}"', to_jsonb(v_domain)::text),
                            '"{role}"', to_jsonb(v_slot.slot_role)::text),
                    '"{titles}"', v_titles::text)::jsonb,
            format('slot %s: %s at %s', v_id, v_slot.slot_role, v_domain);
    END LOOP;
END
$$;
COMMENT ON FUNCTION pipeline.enrichment_calls(bigint[]) IS
    'Stage 5: for each slot, the Apify request to send (action call, leased to the caller), or done, busy '
    '(another delivery calls) or missing. Built from pipeline.services_in_effect.';

-- Stage 6's calls: the MillionVerifier request for each slot's email
-- (without the key: the receiver adds it), or why not: an address verified
-- already is 'done' and not paid for again.
CREATE FUNCTION pipeline.verification_calls(slot_ids bigint[])
RETURNS TABLE (slot_id bigint, action text, method text, url text, query jsonb, body jsonb, detail text)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_service pipeline.services_in_effect;
    v_id      bigint;
    v_slot    marketing.company_slots;
    v_busy    text;
BEGIN
    SELECT * INTO v_service FROM pipeline.services_in_effect s WHERE s.service = 'millionverifier';
    FOR v_id IN SELECT DISTINCT u.id FROM unnest(slot_ids) AS u(id) WHERE u.id IS NOT NULL ORDER BY u.id LOOP
        SELECT * INTO v_slot FROM marketing.company_slots s WHERE s.id = v_id FOR UPDATE;
        IF NOT FOUND THEN
            RETURN QUERY SELECT v_id, 'missing', NULL::text, NULL::text, NULL::jsonb, NULL::jsonb,
                                format('slot %s does not exist', v_id);
            CONTINUE;
        END IF;
        IF v_slot.email IS NULL THEN
            RETURN QUERY SELECT v_id, 'done', NULL::text, NULL::text, NULL::jsonb, NULL::jsonb,
                                format('slot %s has no email to verify', v_id);
            CONTINUE;
        END IF;
        IF EXISTS (SELECT 1 FROM marketing.email_verification v WHERE v.slot_id = v_id AND v.email = v_slot.email) THEN
            RETURN QUERY SELECT v_id, 'done', NULL::text, NULL::text, NULL::jsonb, NULL::jsonb,
                                format('%s is verified already', v_slot.email);
            CONTINUE;
        END IF;
        v_busy := pipeline._begin_call('verification', v_id, v_slot.email,
                                       make_interval(secs => v_service.call_timeout_s + 30));
        IF v_busy IS NOT NULL THEN
            RETURN QUERY SELECT v_id, 'busy', NULL::text, NULL::text, NULL::jsonb, NULL::jsonb, v_busy;
            CONTINUE;
        END IF;
        RETURN QUERY SELECT v_id, 'call', 'GET', v_service.base_url || '/api/v3/',
            jsonb_build_object('email', v_slot.email, 'timeout', v_service.call_timeout_s::text),
            NULL::jsonb, format('slot %s: %s', v_id, v_slot.email);
    END LOOP;
END
$$;
COMMENT ON FUNCTION pipeline.verification_calls(bigint[]) IS
    'Stage 6: for each slot, the MillionVerifier request to send (without the key), or done (no email, or the '
    'address is verified already), busy or missing.';

-- What a service's failure means for the delivery: the HTTP status the
-- receiver answers, so the deliverer retries the right way.
--   no answer: 504 after a timeout, else 503       429: 429 (with Retry-After)
--   408 (Apify's run outlived run-sync): 504       5xx: 503
--   401, 402, 403 (key, credits), 400 and 404 (the actor's input or id):
--     424, not retried: a person must fix the configuration
--   anything else: 502
CREATE FUNCTION pipeline._failure_status(http_status integer, error text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE
        WHEN http_status IS NULL THEN CASE WHEN error ~* 'time[ds]?[ -]?out' THEN 504 ELSE 503 END
        WHEN http_status = 429 THEN 429
        WHEN http_status = 408 THEN 504
        WHEN http_status IN (400, 401, 402, 403, 404) THEN 424
        WHEN http_status >= 500 THEN 503
        ELSE 502
    END
$$;

-- Records what the service answered for one slot's call and says what it
-- means: 200 with the outcome when the work is recorded (the slot filled,
-- or the verification stored), else the status the delivery should answer
-- (pipeline._failure_status), the Retry-After to pass on (seconds), and the
-- failure in words, kept in pipeline.service_calls. http_status is NULL
-- when no answer came (error says why). MillionVerifier's failures that
-- come as HTTP 200 ("result": "error": a bad key, no credits) are read from
-- the body.
CREATE FUNCTION pipeline.finish_call(stage text, slot bigint, http_status integer, body text,
                                     retry_after_header text DEFAULT NULL, error text DEFAULT NULL)
RETURNS TABLE (slot_id bigint, status integer, retry_after integer, outcome text)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_service text := CASE stage WHEN 'enrichment' THEN 'apify' ELSE 'millionverifier' END;
    v_json    jsonb;
    v_status  integer;
    v_wait    integer;
    v_error   text;
    v_outcome text;
BEGIN
    IF stage IS NULL OR stage NOT IN ('enrichment', 'verification') THEN
        RAISE EXCEPTION 'pipeline.finish_call: stage must be enrichment or verification, not %',
                        coalesce(quote_literal(stage), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF http_status BETWEEN 200 AND 299 THEN
        BEGIN
            v_json := body::jsonb;
        EXCEPTION WHEN invalid_text_representation THEN
            v_json := NULL;
        END;
        IF v_json IS NULL THEN
            v_status := 502;
            v_error := format('%s answered HTTP %s with a body that is not JSON', v_service, http_status);
        ELSIF stage = 'verification' AND (v_json ->> 'result' = 'error' OR coalesce(v_json ->> 'error', '') <> '') THEN
            v_error := format('%s: %s', v_service, coalesce(nullif(v_json ->> 'error', ''), 'error without a message'));
            -- A key it does not know, or no credits left: a person must act.
            v_status := CASE WHEN v_json ->> 'error' ~* 'api ?key|credit|balance|unauthori[sz]ed|suspended'
                             THEN 424 ELSE 502 END;
        ELSIF stage = 'enrichment' AND jsonb_typeof(v_json) <> 'array' THEN
            v_status := 502;
            v_error := format('%s answered HTTP %s with JSON that is not the array of dataset items',
                              v_service, http_status);
        ELSE
            -- NB: what the database refuses to record (an answer about
            -- another address, a slot gone) is that part's failure too.
            BEGIN
                IF stage = 'enrichment' THEN
                    v_outcome := pipeline.record_enrichment(finish_call.slot, v_json);
                ELSE
                    PERFORM pipeline.record_verification(finish_call.slot, v_json);
                    v_outcome := 'verified ' || (v_json ->> 'result');
                END IF;
            EXCEPTION WHEN data_exception OR integrity_constraint_violation OR no_data_found
                           OR invalid_parameter_value OR external_routine_exception THEN
                v_status := 422;
                v_error := SQLERRM;
            END;
        END IF;
    ELSE
        v_status := pipeline._failure_status(http_status, error);
        v_error := format('%s: %s%s', v_service,
                          CASE WHEN http_status IS NULL THEN 'no answer' ELSE 'HTTP ' || http_status END,
                          coalesce(': ' || nullif(left(regexp_replace(coalesce(error, body, ''), '\s+', ' ', 'g'), 300), ''), ''));
    END IF;
    -- NB: recording ended the call (record_enrichment, record_verification).
    IF v_status IS NULL THEN
        RETURN QUERY SELECT finish_call.slot, 200, NULL::integer, v_outcome;
        RETURN;
    END IF;
    -- The service's own wait, else 30 s for a rate limit, so that the
    -- deliverer holds back from the service.
    IF v_status = 429 THEN
        v_wait := CASE WHEN finish_call.retry_after_header ~ '^\s*[0-9]{1,6}\s*$' THEN btrim(finish_call.retry_after_header)::integer
                       ELSE 30 END;
    END IF;
    v_error := pipeline._mask_keys(v_error);
    INSERT INTO pipeline.service_calls AS c (stage, slot_id, subject, leased_until, last_status, last_error, failed_at,
                                             answer_status, retry_after_s)
    SELECT finish_call.stage, finish_call.slot, '', NULL, coalesce(http_status, 0), v_error, now(), v_status, v_wait
    WHERE EXISTS (SELECT 1 FROM marketing.company_slots s WHERE s.id = finish_call.slot)
    ON CONFLICT ON CONSTRAINT service_calls_pkey DO UPDATE
    SET leased_until = NULL, last_status = excluded.last_status, last_error = excluded.last_error, failed_at = now(),
        answer_status = excluded.answer_status, retry_after_s = excluded.retry_after_s;
    RETURN QUERY SELECT finish_call.slot, v_status, v_wait, v_error;
END
$$;
COMMENT ON FUNCTION pipeline.finish_call(text, bigint, integer, text, text, text) IS
    'Records a service''s answer to one slot''s call (enrichment: Apify''s dataset items; verification: '
    'MillionVerifier''s answer) and returns 200 with the outcome, or the status the delivery should answer '
    '(429, 503, 504, 502, 424), the Retry-After in seconds, and the failure in words.';

-- The one answer of a delivery whose work has several parts (the slots of
-- the event), read from what is recorded, so that it holds whichever
-- receiver did the work, and however it went: 200 when every slot's work
-- is recorded; else the most urgent failure, so that the deliverer retries
-- the undone parts the right way (the parts done are not redone): 429 (the
-- longest Retry-After), then 503/504/502, then 409 (a part another delivery
-- is calling for), then 424 (a person must act), then 422. The body names
-- every part.
CREATE FUNCTION pipeline.stage_answer(stage text, slot_ids bigint[])
RETURNS TABLE (status integer, retry_after integer, body jsonb)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    WITH p AS (
        SELECT u.id AS slot_id,
               CASE WHEN s.id IS NULL THEN 422
                    WHEN stage_answer.stage = 'enrichment' AND s.enrichment_status IN ('enriched', 'not_found') THEN 200
                    WHEN stage_answer.stage = 'verification'
                         AND (s.email IS NULL OR EXISTS (SELECT 1 FROM marketing.email_verification v
                                                         WHERE v.slot_id = s.id AND v.email = s.email)) THEN 200
                    WHEN c.leased_until > now() THEN 409
                    ELSE coalesce(c.answer_status, 503) END AS status,
               CASE WHEN c.leased_until IS NULL OR c.leased_until <= now() THEN c.retry_after_s END AS retry_after,
               CASE WHEN s.id IS NULL THEN format('slot %s does not exist', u.id)
                    WHEN stage_answer.stage = 'enrichment' AND s.enrichment_status IN ('enriched', 'not_found')
                        THEN s.enrichment_status
                    WHEN stage_answer.stage = 'verification' AND s.email IS NULL THEN 'no email to verify'
                    WHEN stage_answer.stage = 'verification'
                         AND EXISTS (SELECT 1 FROM marketing.email_verification v WHERE v.slot_id = s.id AND v.email = s.email)
                        THEN 'verified'
                    WHEN c.leased_until > now() THEN format('another delivery is calling for it until %s', c.leased_until)
                    ELSE coalesce(c.last_error, 'not called: the receiver recorded no answer for it') END AS outcome
        FROM (SELECT DISTINCT x.id FROM unnest(slot_ids) AS x(id) WHERE x.id IS NOT NULL) u
        LEFT JOIN marketing.company_slots s ON s.id = u.id
        LEFT JOIN pipeline.service_calls c ON c.stage = stage_answer.stage AND c.slot_id = u.id
    ), worst AS (
        SELECT p.status FROM p WHERE p.status NOT BETWEEN 200 AND 299
        ORDER BY CASE WHEN p.status = 429 THEN 0 WHEN p.status >= 500 THEN 1 WHEN p.status = 409 THEN 2
                      WHEN p.status = 424 THEN 3 ELSE 4 END, p.status DESC
        LIMIT 1
    )
    SELECT coalesce(w.status, 200),
           (SELECT max(p.retry_after) FROM p WHERE p.status = w.status),
           CASE WHEN w.status IS NULL
                THEN jsonb_build_object('parts', coalesce((SELECT jsonb_agg(jsonb_build_object('slot_id', p.slot_id, 'outcome', p.outcome)
                                                                            ORDER BY p.slot_id) FROM p), '[]'))
                ELSE jsonb_build_object(
                    'error', (SELECT string_agg(format('slot %s: %s', p.slot_id, p.outcome), '; ' ORDER BY p.slot_id)
                              FROM p WHERE p.status NOT BETWEEN 200 AND 299),
                    'parts', (SELECT jsonb_agg(jsonb_build_object('slot_id', p.slot_id, 'status', p.status,
                                                                  'outcome', p.outcome) ORDER BY p.slot_id) FROM p))
           END
    FROM (SELECT NULL) one LEFT JOIN worst w ON true
$$;
COMMENT ON FUNCTION pipeline.stage_answer(text, bigint[]) IS
    'The answer of a delivery of enrichment or verification work for slot_ids, from what is recorded: 200 when '
    'every slot''s work is, else the most urgent failure (429 with the longest Retry-After, 5xx, 409, 424, 422) '
    'with every part named in the body.';


-- ==== from sql/011_webhooks.sql ====

-- 011_webhooks.sql: where each event type is delivered.
--
-- One endpoint per event type. Events whose type has no enabled endpoint stay
-- pending: they are not lost, dropped or counted as failed, and go out once an
-- endpoint is registered or enabled again. Deployments keep the registry as
-- n8n_webhook_registry.json; import_registry loads it, export_registry gives
-- it back in the same shape.

-- Why a header set is unusable, or NULL when it is fine: a JSON object of at
-- most 64 header names (HTTP tokens of at most 256 characters) to string
-- values of at most 8192 bytes without control characters (tab allowed),
-- 16384 bytes in all, leaving alone the headers the worker sets itself.
CREATE FUNCTION pipeline._header_problem(headers jsonb) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE
        WHEN headers IS NULL THEN 'headers must not be NULL (use {} for none)'
        WHEN jsonb_typeof(headers) <> 'object' THEN
            'headers must be a JSON object of names to strings, not ' || jsonb_typeof(headers)
        WHEN (SELECT count(*) FROM jsonb_object_keys(headers)) > 64 THEN
            'headers: at most 64 headers, not ' || (SELECT count(*) FROM jsonb_object_keys(headers))
        ELSE coalesce((
            SELECT string_agg(problem, '; ')
            FROM (
                SELECT CASE
                    WHEN h.key !~ '^[!#$%&''*+.^_`|~0-9A-Za-z-]+$' THEN
                        format('header name %s is not a valid HTTP header name', to_json(h.key))
                    WHEN char_length(h.key) > 256 THEN
                        format('header name %s... is longer than 256 characters', to_json(left(h.key, 40)))
                    WHEN lower(h.key) IN ('content-type', 'content-length', 'host', 'transfer-encoding',
                                          'connection', 'webhook-id', 'webhook-timestamp', 'webhook-signature') THEN
                        format('header %s is set by the worker and cannot be overridden', to_json(h.key))
                    WHEN jsonb_typeof(h.value) <> 'string' THEN
                        format('header %s must have a string value, not %s', to_json(h.key), jsonb_typeof(h.value))
                    WHEN h.value #>> '{}' ~ '[\r\n]' THEN
                        format('header %s must not contain line breaks', to_json(h.key))
                    WHEN h.value #>> '{}' ~ '[\x01-\x08\x0b-\x1f\x7f]' THEN
                        format('header %s must not contain control characters', to_json(h.key))
                    WHEN octet_length(h.value #>> '{}') > 8192 THEN
                        format('header %s is longer than 8192 bytes (%s)', to_json(h.key), octet_length(h.value #>> '{}'))
                END AS problem
                FROM jsonb_each(headers) AS h
            ) p),
            CASE WHEN (SELECT sum(octet_length(h.key) + octet_length(h.value #>> '{}'))
                       FROM jsonb_each(headers) AS h) > 16384
                 THEN 'headers are longer than 16384 bytes in all' END)
    END
$$;


-- A URL as error messages quote it (a JSON string): whatever stands before
-- an @ in its authority (user:password, a token) is masked, so that a
-- refusal never repeats a credential into the client's screen or the log.
CREATE FUNCTION pipeline._url_shown(url text) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT to_json(regexp_replace(url, '^([^/?#]*//)[^/?#]*@', '\1***@'))::text
$$;

-- Why a webhook URL is unusable, or NULL when it is fine: an http(s) URL of
-- at most 2048 characters, of printable ASCII (percent-encode the rest, use
-- punycode for international host names), with a host name, an IPv4 address
-- or a bracketed IPv6 address, an optional port up to 65535, no user:password@.
CREATE FUNCTION pipeline._url_problem(url text) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE
        WHEN url IS NULL THEN 'url must not be NULL'
        WHEN char_length(url) > 2048 THEN 'url is longer than 2048 characters'
        WHEN url ~ '[\x01-\x20\x7f]' THEN
            format('url %s must not contain spaces or control characters', pipeline._url_shown(url))
        WHEN url ~ '[^\x01-\x7f]' THEN
            format('url %s must be ASCII: percent-encode other characters, use punycode for international host names',
                   pipeline._url_shown(url))
        WHEN url !~* '^https?://' THEN format('url %s is not an http:// or https:// URL', pipeline._url_shown(url))
        WHEN url ~ '^[^/]+//[^/?#]*@' THEN
            format('url %s must not carry user:password@ (use an Authorization header)', pipeline._url_shown(url))
        WHEN url !~* ('^https?://(\[[0-9a-f:.]+\]|[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?)(:[0-9]{1,5})?'
                      || '([/?#][]a-z0-9._~:/?#@!$&''()*+,;=%[-]*)?$') THEN
            format('url %s is not a valid URL', pipeline._url_shown(url))
        WHEN substring(url FROM '^[^/]+//[^/?#]*:([0-9]+)(?:[/?#]|$)')::integer NOT BETWEEN 1 AND 65535 THEN
            format('url %s has a port outside 1-65535', pipeline._url_shown(url))
    END
$$;


-- Standard Webhooks secrets are whsec_ followed by base64 (canonical, no
-- spaces); other secrets are used as they are (their UTF-8 bytes are the
-- HMAC key). At most 1024 characters, no control characters.
CREATE FUNCTION pipeline._secret_problem(secret text) RETURNS text
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_encoded text;
BEGIN
    IF secret IS NULL THEN
        RETURN NULL;
    ELSIF pipeline._is_blank(secret) THEN
        RETURN 'secret is blank (use NULL for no signature)';
    ELSIF char_length(secret) > 1024 THEN
        RETURN 'secret is longer than 1024 characters';
    ELSIF secret ~ '[\x01-\x1f\x7f]' THEN
        RETURN 'secret must not contain control characters';
    ELSIF secret LIKE 'whsec\_%' THEN
        v_encoded := substr(secret, 7);
        IF v_encoded !~ '^[A-Za-z0-9+/]+={0,2}$' OR length(v_encoded) % 4 <> 0 THEN
            RETURN 'secret whsec_... must continue with base64 (A-Z a-z 0-9 + /, = padding, no spaces)';
        END IF;
        -- NB: decode() tolerates what the worker's decoder refuses (stray bits
        -- in the last character): only the canonical form is accepted.
        IF replace(encode(decode(v_encoded, 'base64'), 'base64'), E'\n', '') <> v_encoded THEN
            RETURN 'secret whsec_... is not canonical base64';
        END IF;
    END IF;
    RETURN NULL;
END
$$;

-- Endpoints: headers and secrets move to pipeline.webhook_credentials below.
ALTER TABLE pipeline.webhooks
    ADD CONSTRAINT url_valid CHECK (pipeline._url_problem(url) IS NULL),
    DROP CONSTRAINT timeout_ms_range,
    ADD CONSTRAINT timeout_ms_range CHECK (timeout_ms BETWEEN 1 AND 900000),
    ADD COLUMN confirm_header text,
    ADD CONSTRAINT confirm_header_is_a_header_name CHECK (confirm_header ~ '^[A-Za-z0-9!#$%&''*+.^_`|~-]{1,100}$');

COMMENT ON TABLE pipeline.webhooks IS
    'Where events are delivered: one endpoint per event type (its headers and secret are in pipeline.webhook_credentials).';

COMMENT ON COLUMN pipeline.webhooks.timeout_ms IS
    'Request timeout (at most 15 minutes: a receiver that calls slow services); NULL uses pipeline.http_timeout.';

COMMENT ON COLUMN pipeline.webhooks.confirm_header IS
    'A response header the receiver sets when its work is done: a 2xx without it (a proxy''s page, n8n answering '
    '200 while it starts up) is not taken as delivered, but retried. NULL: any 2xx is delivered.';

COMMENT ON COLUMN pipeline.webhooks.max_in_flight IS 'At most this many deliveries to the endpoint at once; NULL: pipeline.concurrency.';

COMMENT ON COLUMN pipeline.webhooks.disabled_reason IS 'Why the endpoint is disabled (by hand, or 410 Gone from the receiver).';


-- Event types that are recorded and never delivered, by design: the last
-- stage's email_verified (stage 7 is a view, nothing receives it), or a
-- user's audit-only events. They are not waiting work: the deliverers settle
-- them as processed (pipeline.purge), retention removes them like delivered
-- ones, pipeline.status() and the backlog views leave them out, and the
-- funnel still counts the rows they are about. An endpoint cannot be
-- registered for such a type (and a type with an endpoint cannot be marked).
CREATE TABLE pipeline.undelivered_types (
    event_type pipeline.event_type PRIMARY KEY,
    reason     text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT reason_not_blank CHECK (NOT pipeline._is_blank(reason))
);
COMMENT ON TABLE pipeline.undelivered_types IS
    'Event types recorded without delivery by design (email_verified): settled as processed, never waiting work.';
INSERT INTO pipeline.undelivered_types (event_type, reason)
VALUES ('email_verified', 'the last stage''s event: stage 7 (outreach ready) is the view marketing.vw_outreach_ready, '
                          'nothing receives it');
GRANT SELECT ON pipeline.undelivered_types TO PUBLIC;

-- Marks an event type as recorded without delivery (reason says why).
CREATE FUNCTION pipeline.undeliver_type(event_type text, reason text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pipeline._check_event_type(event_type);
    IF reason IS NULL OR pipeline._is_blank(reason) THEN
        RAISE EXCEPTION 'pipeline.undeliver_type: reason must say why % is not delivered', quote_literal(event_type)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF EXISTS (SELECT 1 FROM pipeline.webhooks w WHERE w.event_type = undeliver_type.event_type) THEN
        RAISE EXCEPTION 'pipeline.undeliver_type: event_type % has an endpoint', quote_literal(event_type)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Remove it first (pipeline.remove_webhook).';
    END IF;
    INSERT INTO pipeline.undelivered_types AS u (event_type, reason)
    VALUES (undeliver_type.event_type, undeliver_type.reason)
    ON CONFLICT ON CONSTRAINT undelivered_types_pkey DO UPDATE SET reason = excluded.reason;
END
$$;
COMMENT ON FUNCTION pipeline.undeliver_type(text, text) IS
    'Marks an event type as recorded without delivery: its events end as processed and are not waiting work.';

-- Lets an event type be delivered again (register its endpoint next);
-- events settled meanwhile stay settled (pipeline.replay sends them).
CREATE FUNCTION pipeline.deliver_type(event_type text) RETURNS boolean
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    WITH gone AS (
        DELETE FROM pipeline.undelivered_types u WHERE u.event_type = deliver_type.event_type RETURNING 1
    )
    SELECT EXISTS (SELECT 1 FROM gone)
$$;
COMMENT ON FUNCTION pipeline.deliver_type(text) IS
    'Lets an event type marked with pipeline.undeliver_type be delivered again; true when it was marked.';

-- What an endpoint sends that nobody else should see: its headers (an
-- Authorization header, for one) and its signing secret. A table of its own
-- so that reading the endpoints needs no right on these, and so that the
-- extension leaves them out of pg_dump (docs/security.md says how to carry
-- them). One row per endpoint, made and removed with it.
CREATE TABLE pipeline.webhook_credentials (
    event_type pipeline.event_type PRIMARY KEY
               REFERENCES pipeline.webhooks (event_type) ON DELETE CASCADE ON UPDATE CASCADE,
    headers    jsonb NOT NULL DEFAULT '{}',
    secret     text,
    CONSTRAINT headers_valid CHECK (pipeline._header_problem(headers) IS NULL),
    CONSTRAINT secret_valid CHECK (pipeline._secret_problem(secret) IS NULL)
);

-- Every endpoint's headers and secret, as 0.1.0 kept them in pipeline.webhooks.
INSERT INTO pipeline.webhook_credentials (event_type, headers, secret)
SELECT w.event_type, w.headers, w.secret FROM pipeline.webhooks w;
ALTER TABLE pipeline.webhooks DROP COLUMN headers, DROP COLUMN secret;

COMMENT ON TABLE pipeline.webhook_credentials IS
    'The headers and signing secret of each endpoint of pipeline.webhooks. Secrets: grant SELECT with care; not in pg_dump.';

COMMENT ON COLUMN pipeline.webhook_credentials.headers IS 'Extra request headers, e.g. {"Authorization": "Basic ..."} for n8n Basic Auth.';

COMMENT ON COLUMN pipeline.webhook_credentials.secret IS 'Signing secret (whsec_<base64> as in Standard Webhooks); NULL sends no webhook-signature.';


-- A deliverer that listens (pipeline-relay) hears on the channel
-- pipeline_wake of what can make waiting events deliverable without a new
-- event: an endpoint registered, enabled or given its credentials back, a
-- replay (pipeline._requeue); and of an endpoint changed or removed, for
-- which it claims again what it holds (the payload names the table). New events are announced on pipeline_event.
-- (The extension's worker is woken by its library; this costs it nothing
-- while no one listens.)
-- Only statements that changed rows announce (a NOTIFY takes a lock that
-- every committing NOTIFY waits for); transition tables tell, and they
-- take one trigger per event.
CREATE FUNCTION pipeline._announce_wake() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM changed) THEN
        PERFORM pg_notify('pipeline_wake', TG_TABLE_NAME);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER pipeline_announce_wake_insert AFTER INSERT ON pipeline.webhooks
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION pipeline._announce_wake();

CREATE TRIGGER pipeline_announce_wake_update AFTER UPDATE ON pipeline.webhooks
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION pipeline._announce_wake();

CREATE TRIGGER pipeline_announce_wake_insert AFTER INSERT ON pipeline.webhook_credentials
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION pipeline._announce_wake();

CREATE TRIGGER pipeline_announce_wake_update AFTER UPDATE ON pipeline.webhook_credentials
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION pipeline._announce_wake();
-- A removed endpoint: a deliverer takes back what it holds for it.
CREATE TRIGGER pipeline_announce_wake_delete AFTER DELETE ON pipeline.webhooks
    REFERENCING OLD TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION pipeline._announce_wake();
CREATE TRIGGER pipeline_announce_wake_delete AFTER DELETE ON pipeline.webhook_credentials
    REFERENCING OLD TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION pipeline._announce_wake();


-- Storing an endpoint's headers and secret.
CREATE FUNCTION pipeline._store_credentials(event_type text, headers jsonb, secret text) RETURNS void
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    INSERT INTO pipeline.webhook_credentials AS c (event_type, headers, secret)
    VALUES (event_type, headers, secret)
    ON CONFLICT (event_type) DO UPDATE SET headers = excluded.headers, secret = excluded.secret
    WHERE (c.headers, c.secret) IS DISTINCT FROM (excluded.headers, excluded.secret)
$$;


-- Raises the first problem of an endpoint's fields, naming the field.
CREATE FUNCTION pipeline._check_webhook(
    event_type text, url text, method text, headers jsonb, secret text,
    timeout_ms integer, max_in_flight integer, allow_unknown_type boolean, context text,
    confirm_header text DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_problem text;
BEGIN
    PERFORM pipeline._check_event_type(event_type);
    IF EXISTS (SELECT 1 FROM pipeline.undelivered_types u WHERE u.event_type = _check_webhook.event_type) THEN
        RAISE EXCEPTION '%event_type % is recorded without delivery: %', context, quote_literal(event_type),
                        (SELECT u.reason FROM pipeline.undelivered_types u WHERE u.event_type = _check_webhook.event_type)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'pipeline.deliver_type(event_type) lets its events be delivered again; then register the endpoint.';
    END IF;
    IF NOT coalesce(allow_unknown_type, false)
       AND NOT EXISTS (SELECT 1 FROM pipeline.stages s WHERE s.event_type = _check_webhook.event_type)
       AND NOT EXISTS (SELECT 1 FROM pipeline.watches w WHERE w.event_type = _check_webhook.event_type) THEN
        RAISE EXCEPTION '%unknown event type %', context, quote_literal(event_type)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'No stage or watch emits it. Watch a table first, or pass allow_unknown_type => true '
                         'for events sent with pipeline.emit.';
    END IF;
    v_problem := coalesce(
        pipeline._url_problem(url),
        CASE WHEN method IS NULL OR upper(method) NOT IN ('POST', 'PUT', 'PATCH')
             THEN format('method must be POST, PUT or PATCH, not %s', coalesce(to_json(method)::text, 'NULL')) END,
        pipeline._header_problem(headers),
        pipeline._secret_problem(secret),
        CASE WHEN timeout_ms NOT BETWEEN 1 AND 900000
             THEN format('timeout_ms must be between 1 and 900000 (15 minutes), not %s', timeout_ms) END,
        CASE WHEN max_in_flight NOT BETWEEN 1 AND 1000
             THEN format('max_in_flight must be between 1 and 1000, not %s', max_in_flight) END,
        CASE WHEN confirm_header !~ '^[A-Za-z0-9!#$%&''*+.^_`|~-]{1,100}$'
             THEN format('confirm_header must be a header name (letters, digits and !#$%%&''*+.^_`|~-, at most 100), not %s',
                         to_json(confirm_header)) END);
    IF v_problem IS NOT NULL THEN
        RAISE EXCEPTION '%', context || v_problem USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;


-- Registering (or replacing) the endpoint of an event type.
CREATE FUNCTION pipeline.register_webhook(
    event_type         text,
    url                text,
    method             text DEFAULT 'POST',
    headers            jsonb DEFAULT '{}',
    secret             text DEFAULT NULL,
    timeout_ms         integer DEFAULT NULL,
    max_in_flight      integer DEFAULT NULL,
    enabled            boolean DEFAULT true,
    allow_unknown_type boolean DEFAULT false,
    confirm_header     text DEFAULT NULL
) RETURNS pipeline.webhooks
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_row pipeline.webhooks;
BEGIN
    PERFORM pipeline._check_webhook(event_type, url, method, headers, secret, timeout_ms, max_in_flight,
                                    allow_unknown_type, 'pipeline.register_webhook: ', confirm_header);
    INSERT INTO pipeline.webhooks AS w
        (event_type, url, method, timeout_ms, max_in_flight, enabled, disabled_reason, confirm_header)
    VALUES (event_type, url, upper(method), timeout_ms, max_in_flight, coalesce(enabled, true),
            CASE WHEN NOT coalesce(enabled, true) THEN 'registered disabled' END, confirm_header)
    ON CONFLICT ON CONSTRAINT webhooks_pkey DO UPDATE
    SET url = excluded.url, method = excluded.method,
        timeout_ms = excluded.timeout_ms, max_in_flight = excluded.max_in_flight, enabled = excluded.enabled,
        disabled_reason = excluded.disabled_reason, confirm_header = excluded.confirm_header, updated_at = now()
    RETURNING * INTO v_row;
    PERFORM pipeline._store_credentials(register_webhook.event_type, register_webhook.headers, register_webhook.secret);
    RETURN v_row;
END
$$;

COMMENT ON FUNCTION pipeline.register_webhook(text, text, text, jsonb, text, integer, integer, boolean, boolean, text) IS
    'Registers the endpoint for an event type, replacing any earlier one; returns it (its headers and secret '
    'go to pipeline.webhook_credentials).';


-- Changing some fields of an endpoint; NULL leaves a field as it is.
-- secret => '' and confirm_header => '' remove them; timeout_ms => 0 and
-- max_in_flight => 0 go back to the global settings.
CREATE FUNCTION pipeline.update_webhook(
    event_type    text,
    url           text DEFAULT NULL,
    method        text DEFAULT NULL,
    headers       jsonb DEFAULT NULL,
    secret        text DEFAULT NULL,
    timeout_ms    integer DEFAULT NULL,
    max_in_flight integer DEFAULT NULL,
    confirm_header text DEFAULT NULL
) RETURNS pipeline.webhooks
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_old     pipeline.webhooks;
    v_new     pipeline.webhooks;
    v_headers jsonb;
    v_secret  text;
BEGIN
    v_old := pipeline._require_webhook(event_type);
    SELECT c.headers, c.secret INTO v_headers, v_secret
    FROM pipeline.webhook_credentials c WHERE c.event_type = v_old.event_type;
    v_new := v_old;
    v_new.url := coalesce(url, v_old.url);
    v_new.method := upper(coalesce(method, v_old.method));
    v_headers := coalesce(headers, v_headers, '{}');
    v_secret := CASE WHEN secret = '' THEN NULL ELSE coalesce(secret, v_secret) END;
    v_new.timeout_ms := CASE WHEN timeout_ms = 0 THEN NULL ELSE coalesce(timeout_ms, v_old.timeout_ms) END;
    v_new.max_in_flight := CASE WHEN max_in_flight = 0 THEN NULL ELSE coalesce(max_in_flight, v_old.max_in_flight) END;
    v_new.confirm_header := CASE WHEN confirm_header = '' THEN NULL ELSE coalesce(confirm_header, v_old.confirm_header) END;
    PERFORM pipeline._check_webhook(v_new.event_type, v_new.url, v_new.method, v_headers, v_secret,
                                    v_new.timeout_ms, v_new.max_in_flight, true, 'pipeline.update_webhook: ',
                                    v_new.confirm_header);
    UPDATE pipeline.webhooks w
    SET url = v_new.url, method = v_new.method,
        timeout_ms = v_new.timeout_ms, max_in_flight = v_new.max_in_flight, confirm_header = v_new.confirm_header,
        updated_at = now()
    WHERE w.event_type = v_old.event_type
    RETURNING * INTO v_new;
    PERFORM pipeline._store_credentials(v_new.event_type, v_headers, v_secret);
    RETURN v_new;
END
$$;

COMMENT ON FUNCTION pipeline.update_webhook(text, text, text, jsonb, text, integer, integer, text) IS
    'Changes the given fields of an endpoint (NULL keeps a field; secret => '''' removes the secret, '
    'confirm_header => '''' removes it, timeout_ms => 0 and max_in_flight => 0 restore the global settings); '
    'returns it.';


CREATE FUNCTION pipeline._set_enabled(event_type text, enabled boolean, reason text) RETURNS pipeline.webhooks
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_row pipeline.webhooks;
BEGIN
    PERFORM pipeline._require_webhook(event_type);
    UPDATE pipeline.webhooks w
    SET enabled = _set_enabled.enabled, disabled_reason = reason, updated_at = now()
    WHERE w.event_type = _set_enabled.event_type
    RETURNING * INTO v_row;
    RETURN v_row;
END
$$;


-- Stopping deliveries to an endpoint; its events wait.
CREATE FUNCTION pipeline.disable_webhook(event_type text, reason text DEFAULT 'disabled by hand')
RETURNS pipeline.webhooks
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    SELECT pipeline._set_enabled(event_type, false, coalesce(nullif(btrim(reason), ''), 'disabled by hand'))
$$;

COMMENT ON FUNCTION pipeline.disable_webhook(text, text) IS
    'Stops deliveries to the endpoint of an event type; its events wait until it is enabled again.';


-- Resuming deliveries to an endpoint.
CREATE FUNCTION pipeline.enable_webhook(event_type text) RETURNS pipeline.webhooks
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    SELECT pipeline._set_enabled(event_type, true, NULL)
$$;

COMMENT ON FUNCTION pipeline.enable_webhook(text) IS
    'Resumes deliveries to the endpoint of an event type (also after a 410 Gone disabled it).';


-- Removing an endpoint; its events wait for a new one.
CREATE FUNCTION pipeline.remove_webhook(event_type text) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    DELETE FROM pipeline.webhooks w WHERE w.event_type = remove_webhook.event_type;
    RETURN FOUND;
END
$$;

COMMENT ON FUNCTION pipeline.remove_webhook(text) IS
    'Removes the endpoint of an event type (false if there was none); its events wait for a new one.';


CREATE FUNCTION pipeline._require_webhook(event_type text) RETURNS pipeline.webhooks
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_row pipeline.webhooks;
BEGIN
    SELECT * INTO v_row FROM pipeline.webhooks w WHERE w.event_type = _require_webhook.event_type;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no webhook is registered for event type %', coalesce(quote_literal(event_type), 'NULL')
            USING ERRCODE = 'no_data_found';
    END IF;
    RETURN v_row;
END
$$;


-- Loading n8n_webhook_registry.json:
--   {"base_url": "https://x.app.n8n.cloud",
--    "webhooks": {"company_created": "/webhook/validate-company", ...}}
-- A value is a path joined to base_url, a full URL, or an object with url and
-- the optional fields method, headers, secret, timeout_ms, max_in_flight,
-- enabled, allow_unknown_type (an event type sent with pipeline.emit, which
-- no stage or watch produces; export_registry writes it). All or nothing; the same file twice changes nothing. Endpoints not
-- in the file stay as they are, and so does the enabled flag of an existing
-- endpoint unless the file sets it.
CREATE FUNCTION pipeline.import_registry(registry jsonb)
RETURNS TABLE (event_type text, url text, action text)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_base    text;
    v_key     text;
    v_entry   record;
    v_spec    jsonb;
    v_url     text;
    v_old     pipeline.webhooks;
    v_new     pipeline.webhooks;
    v_old_headers jsonb;
    v_old_secret  text;
    v_headers jsonb;
    v_secret  text;
    v_where   text;
BEGIN
    IF registry IS NULL OR jsonb_typeof(registry) <> 'object' THEN
        RAISE EXCEPTION 'registry must be a JSON object with base_url and webhooks'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR v_key IN SELECT jsonb_object_keys(registry) LOOP
        IF v_key NOT IN ('base_url', 'headers', 'confirm_header', 'webhooks') THEN
            RAISE EXCEPTION 'registry: unknown key % (expected base_url, headers, confirm_header and webhooks)', to_json(v_key)
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END LOOP;
    -- Headers every endpoint of the file sends (an n8n Header Auth, say); an
    -- endpoint's own headers of the same name win. Their values come from
    -- the loader (an environment variable or a file, n8n/README.md), never
    -- from the committed file: a reference left unresolved is refused.
    PERFORM pipeline._check_json_type('registry: ', registry, 'headers', 'object');
    -- The response header every endpoint of the file confirms its work with
    -- (an endpoint's own wins).
    PERFORM pipeline._check_json_type('registry: ', registry, 'confirm_header', 'string');
    FOR v_entry IN SELECT h.key, h.value FROM jsonb_each(registry -> 'headers') h LOOP
        IF jsonb_typeof(v_entry.value) <> 'string' THEN
            -- NB: the value itself is not repeated: it may be the secret.
            RAISE EXCEPTION 'registry: headers.%: the value must be a string, not %; a reference such as {"$env": ...} must be replaced by its value before the import',
                v_entry.key, jsonb_typeof(v_entry.value)
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'n8n/README.md shows how to load the registry with the header''s value from an environment variable or a file.';
        END IF;
    END LOOP;
    IF registry ? 'base_url' THEN
        IF jsonb_typeof(registry -> 'base_url') <> 'string'
           OR pipeline._url_problem(registry ->> 'base_url') IS NOT NULL
           OR registry ->> 'base_url' ~ '[?#]' THEN
            RAISE EXCEPTION 'registry: base_url must be an http(s) URL without query, not %',
                CASE WHEN jsonb_typeof(registry -> 'base_url') = 'string'
                     THEN pipeline._url_shown(registry ->> 'base_url')
                     ELSE jsonb_typeof(registry -> 'base_url') END
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        v_base := rtrim(registry ->> 'base_url', '/');
    END IF;
    IF jsonb_typeof(registry -> 'webhooks') IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'registry: webhooks must be an object of event types to endpoints'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    FOR v_entry IN SELECT e.key, e.value FROM jsonb_each(registry -> 'webhooks') e ORDER BY e.key LOOP
        v_where := format('registry: webhooks.%s: ', v_entry.key);
        v_spec := CASE WHEN jsonb_typeof(v_entry.value) = 'string' THEN jsonb_build_object('url', v_entry.value)
                       ELSE v_entry.value END;
        IF jsonb_typeof(v_spec) <> 'object' THEN
            RAISE EXCEPTION '%must be a path starting with /, a full URL or an object with url, not %',
                v_where, jsonb_typeof(v_spec)
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        FOR v_key IN SELECT jsonb_object_keys(v_spec) LOOP
            IF v_key NOT IN ('url', 'method', 'headers', 'secret', 'timeout_ms', 'max_in_flight', 'enabled',
                             'allow_unknown_type', 'confirm_header') THEN
                RAISE EXCEPTION '%unknown key % (expected url, method, headers, secret, timeout_ms, max_in_flight, enabled, allow_unknown_type, confirm_header)',
                    v_where, to_json(v_key)
                    USING ERRCODE = 'invalid_parameter_value';
            END IF;
        END LOOP;
        PERFORM pipeline._check_json_type(v_where, v_spec, 'url', 'string');
        PERFORM pipeline._check_json_type(v_where, v_spec, 'method', 'string');
        PERFORM pipeline._check_json_type(v_where, v_spec, 'secret', 'string');
        PERFORM pipeline._check_json_type(v_where, v_spec, 'timeout_ms', 'number');
        PERFORM pipeline._check_json_type(v_where, v_spec, 'max_in_flight', 'number');
        PERFORM pipeline._check_json_type(v_where, v_spec, 'enabled', 'boolean');
        PERFORM pipeline._check_json_type(v_where, v_spec, 'allow_unknown_type', 'boolean');
        PERFORM pipeline._check_json_type(v_where, v_spec, 'confirm_header', 'string');
        IF NOT v_spec ? 'url' THEN
            RAISE EXCEPTION '%url is missing', v_where USING ERRCODE = 'invalid_parameter_value';
        END IF;
        v_url := v_spec ->> 'url';
        IF v_url LIKE '/%' THEN
            IF v_base IS NULL THEN
                RAISE EXCEPTION '%', v_where || pipeline._url_shown(v_url) || ' is a path, but the registry has no base_url'
                    USING ERRCODE = 'invalid_parameter_value';
            END IF;
            v_url := v_base || v_url;
        ELSIF v_url !~* '^https?://' THEN
            RAISE EXCEPTION '%', v_where || pipeline._url_shown(v_url) || ' must be a path starting with / or a full http(s) URL'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        FOR v_key IN SELECT unnest(ARRAY['timeout_ms', 'max_in_flight']) LOOP
            IF v_spec ? v_key AND (v_spec ->> v_key)::numeric <> trunc((v_spec ->> v_key)::numeric) THEN
                RAISE EXCEPTION '%', v_where || v_key || ' must be a whole number' USING ERRCODE = 'invalid_parameter_value';
            END IF;
        END LOOP;

        SELECT * INTO v_old FROM pipeline.webhooks w WHERE w.event_type = v_entry.key;
        SELECT c.headers, c.secret INTO v_old_headers, v_old_secret
        FROM pipeline.webhook_credentials c WHERE c.event_type = v_entry.key;
        v_new.event_type := v_entry.key;
        v_new.url := v_url;
        v_new.method := upper(coalesce(v_spec ->> 'method', 'POST'));
        v_headers := coalesce(registry -> 'headers', '{}') || coalesce(v_spec -> 'headers', '{}');
        v_secret := v_spec ->> 'secret';
        v_new.timeout_ms := (v_spec ->> 'timeout_ms')::numeric::integer;
        v_new.max_in_flight := (v_spec ->> 'max_in_flight')::numeric::integer;
        v_new.enabled := coalesce((v_spec ->> 'enabled')::boolean, v_old.enabled, true);
        v_new.confirm_header := coalesce(v_spec ->> 'confirm_header', registry ->> 'confirm_header');
        PERFORM pipeline._check_webhook(v_new.event_type, v_new.url, v_new.method, v_headers, v_secret,
                                        v_new.timeout_ms, v_new.max_in_flight,
                                        coalesce((v_spec ->> 'allow_unknown_type')::boolean, false), v_where,
                                        v_new.confirm_header);

        event_type := v_new.event_type;
        url := v_new.url;
        IF v_old.event_type IS NULL THEN
            PERFORM pipeline.register_webhook(v_new.event_type, v_new.url, v_new.method, v_headers,
                                              v_secret, v_new.timeout_ms, v_new.max_in_flight, v_new.enabled,
                                              allow_unknown_type => true, confirm_header => v_new.confirm_header);
            action := 'created';
        ELSIF (v_old.url, v_old.method, coalesce(v_old_headers, '{}'), v_old_secret, v_old.timeout_ms, v_old.max_in_flight,
               v_old.enabled, v_old.confirm_header)
              IS NOT DISTINCT FROM
              (v_new.url, v_new.method, v_headers, v_secret, v_new.timeout_ms, v_new.max_in_flight,
               v_new.enabled, v_new.confirm_header) THEN
            action := 'unchanged';
        ELSE
            UPDATE pipeline.webhooks w
            SET url = v_new.url, method = v_new.method,
                timeout_ms = v_new.timeout_ms, max_in_flight = v_new.max_in_flight, enabled = v_new.enabled,
                confirm_header = v_new.confirm_header,
                disabled_reason = CASE WHEN v_new.enabled THEN NULL
                                       ELSE coalesce(w.disabled_reason, 'disabled in the registry') END,
                updated_at = now()
            WHERE w.event_type = v_new.event_type;
            PERFORM pipeline._store_credentials(v_new.event_type, v_headers, v_secret);
            action := 'updated';
        END IF;
        RETURN NEXT;
    END LOOP;
END
$$;

COMMENT ON FUNCTION pipeline.import_registry(jsonb) IS
    'Loads an n8n_webhook_registry.json document into pipeline.webhooks (all or nothing, idempotent); '
    'returns each endpoint with created, updated or unchanged.';


CREATE FUNCTION pipeline._check_json_type(context text, spec jsonb, key text, expected text) RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF spec ? key AND jsonb_typeof(spec -> key) <> expected THEN
        RAISE EXCEPTION '%', format('%s%s must be a %s, not %s', context, key, expected, jsonb_typeof(spec -> key))
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;


-- The registry in the file's shape: base_url is the origin most endpoints
-- share; an endpoint with nothing but a URL under it is written as its path.
CREATE FUNCTION pipeline.export_registry() RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    WITH base AS (
        SELECT substring(w.url FROM '^(https?://[^/?#]+)') AS origin
        FROM pipeline.webhooks w
        GROUP BY 1
        ORDER BY count(*) DESC, 1
        LIMIT 1
    ), entries AS (
        SELECT w.event_type,
               CASE WHEN b.origin IS NOT NULL AND starts_with(w.url, b.origin || '/')
                    THEN substr(w.url, length(b.origin) + 1) ELSE w.url END AS url,
               jsonb_strip_nulls(jsonb_build_object(
                   'method', nullif(w.method, 'POST'),
                   'headers', nullif(c.headers, '{}'),
                   'secret', c.secret,
                   'timeout_ms', w.timeout_ms,
                   'max_in_flight', w.max_in_flight,
                   'confirm_header', w.confirm_header,
                   'enabled', CASE WHEN NOT w.enabled THEN false END,
                   -- Types sent with pipeline.emit: no stage or watch produces them.
                   'allow_unknown_type',
                   CASE WHEN NOT EXISTS (SELECT 1 FROM pipeline.stages s WHERE s.event_type = w.event_type)
                         AND NOT EXISTS (SELECT 1 FROM pipeline.watches x WHERE x.event_type = w.event_type)
                        THEN true END)) AS options
        FROM pipeline.webhooks w
        LEFT JOIN pipeline.webhook_credentials c ON c.event_type = w.event_type
        LEFT JOIN base b ON true
    )
    SELECT jsonb_strip_nulls(jsonb_build_object(
        'base_url', (SELECT origin FROM base),
        'webhooks', coalesce(
            (SELECT jsonb_object_agg(e.event_type,
                                     CASE WHEN e.options = '{}' THEN to_jsonb(e.url)
                                          ELSE jsonb_build_object('url', e.url) || e.options END)
             FROM entries e),
            '{}')))
$$;

COMMENT ON FUNCTION pipeline.export_registry() IS
    'The webhook registry in the shape of n8n_webhook_registry.json; import_registry of it changes nothing.';

-- ==== from sql/012_progress.sql (new in 0.2.0; the funnel moved here from 008_views.sql) ====

-- 012_progress.sql: where every company stands, so that none ends silently.
--
--   marketing.vw_work_progress   one row per company (before it has slots) or
--                                slot: the stage it is at, its state and why
--   marketing.vw_stuck_work      the rows that are stuck: not at an end state,
--                                no event waiting or failing for them, and not
--                                moved for pipeline.stuck_after (default 1h), or
--                                whose last event is dead, or was answered 2xx
--                                by a receiver that recorded nothing
--   marketing.vw_pipeline_funnel per stage: arrived, in progress, done,
--                                failed (with reasons), stuck
--   pipeline.resume_company(..)  sets a company moving again from where it
--                                stopped (pipeline.resume_stuck(): all of them)
--
-- Stages of the work items: 2 validation (pending or invalid intake rows),
-- 3 promotion, 4 slots (companies without slots), 5 enrichment (slots not
-- enriched; not_found ends here), 6 verification (enriched slots without a
-- verification of their email; no email ends here), 7 outreach ready
-- (verified: valid is done, any other result ends here).
-- States: in_progress (an event waits or fails for it, a service call is out,
-- or it moved less than pipeline.stuck_after ago), done (outreach ready),
-- failed (ended at a stage with a reason), stuck.

-- Each stage's work item: the event type that carries it, and the row id
-- that the event names (data.new.id; slots_created: data.key.company_id).
CREATE FUNCTION pipeline._event_row_id(event_type text, payload jsonb) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN event_type = 'slots_created' THEN payload -> 'key' ->> 'company_id'
                ELSE payload -> 'new' ->> 'id' END::bigint
$$;

CREATE VIEW marketing.vw_work_progress AS
WITH stage_events AS MATERIALIZED (
    -- The events of the stage types that are not delivered yet, and the
    -- last dead one of each row: one pass over the open and dead events.
    SELECT e.event_type::text AS event_type, pipeline._event_row_id(e.event_type, e.payload) AS row_id,
           bool_or(e.status IN ('pending', 'processing', 'failed')) AS open,
           (array_agg(e.id ORDER BY e.id DESC) FILTER (WHERE e.status = 'dead'))[1] AS dead_id,
           (array_agg(e.last_error ORDER BY e.id DESC) FILTER (WHERE e.status = 'dead'))[1] AS dead_error,
           -- NB: when the dead event was written: it is about the stage the
           -- row is at when it was written at or after the row got there.
           max(e.created_at) FILTER (WHERE e.status = 'dead') AS dead_at,
           max(e.id) FILTER (WHERE e.status IN ('pending', 'processing', 'failed')) AS open_id,
           (array_agg(e.last_error ORDER BY e.id DESC) FILTER (WHERE e.status = 'failed'))[1] AS failing_error
    -- NB: the open events and the dead ones apart, each from its partial
    -- index: one condition on the four statuses matches neither index, and
    -- PostgreSQL read the whole table, delivered history included (1.5 s
    -- with 20 million delivered events; bin/bench --only history).
    FROM (SELECT o.id, o.event_type, o.payload, o.status, o.last_error, o.created_at
          FROM marketing.pipeline_events o
          WHERE o.status IN ('pending', 'processing', 'failed')
            AND o.event_type IN ('company_created', 'company_validated', 'company_promoted', 'slots_created',
                                 'contact_enriched')
          UNION ALL
          SELECT d.id, d.event_type, d.payload, d.status, d.last_error, d.created_at
          FROM marketing.pipeline_events d
          WHERE d.status = 'dead'
            AND d.event_type IN ('company_created', 'company_validated', 'company_promoted', 'slots_created',
                                 'contact_enriched')) e
    GROUP BY 1, 2
), items AS (
    -- Companies that have no slots yet: at validation, promotion or slots.
    SELECT r.id AS intake_id, m.id AS company_id, NULL::bigint AS slot_id, coalesce(m.company_name, r.company) AS company,
           coalesce(m.domain, pipeline.website_domain(r.website)) AS domain, NULL::text AS slot_role,
           CASE WHEN r.validation_status <> 'valid' THEN 2 WHEN m.id IS NULL THEN 3 ELSE 4 END AS stage_no,
           CASE WHEN r.validation_status = 'invalid'
                THEN 'invalid: ' || array_to_string(r.validation_errors, '; ') END AS ended,
           -- NB: the kind of an end or a stoppage, in the pipeline's words
           -- only (no domain, address or receiver's words): what monitoring
           -- roles see, counted, in the funnel.
           CASE WHEN r.validation_status = 'invalid'
                THEN 'invalid: ' || split_part(r.validation_errors[1], ':', 1) END AS ended_kind,
           CASE WHEN r.validation_status = 'pending' THEN 'company_created'
                WHEN m.id IS NULL THEN 'company_validated' ELSE 'company_promoted' END AS event_type,
           CASE WHEN m.id IS NULL THEN r.id ELSE m.id END AS event_row_id,
           coalesce(m.created_at, r.validated_at, r.created_at) AS since,
           coalesce(m.created_at, r.validated_at, r.created_at) AS entered,
           NULL::timestamptz AS leased_until, NULL::text AS call_error
    FROM intake.company_raw_intake r
    LEFT JOIN marketing.company_master m ON m.intake_id = r.id
    WHERE m.id IS NULL OR NOT EXISTS (SELECT 1 FROM marketing.company_slots s WHERE s.company_id = m.id)
    UNION ALL
    -- Companies entered by hand (no intake row) without slots.
    SELECT NULL, m.id, NULL, m.company_name, m.domain, NULL, 4, NULL, NULL, 'company_promoted', m.id, m.created_at,
           m.created_at, NULL, NULL
    FROM marketing.company_master m
    WHERE m.intake_id IS NULL AND NOT EXISTS (SELECT 1 FROM marketing.company_slots s WHERE s.company_id = m.id)
    UNION ALL
    -- Slots: at enrichment, verification, or outreach ready.
    SELECT m.intake_id, m.id, s.id, m.company_name, m.domain, s.slot_role,
           CASE WHEN s.enrichment_status <> 'enriched' THEN 5
                WHEN s.email IS NULL OR v.result IS NULL THEN 6
                ELSE 7 END,
           CASE WHEN s.enrichment_status = 'not_found' THEN format('nobody found for %s', s.slot_role)
                WHEN s.enrichment_status = 'enriched' AND s.email IS NULL
                    THEN format('%s found for %s, without an email to verify', coalesce(s.full_name, 'someone'), s.slot_role)
                WHEN v.result IS NOT NULL AND v.result <> 'valid' THEN format('%s: %s', s.email, v.result) END,
           CASE WHEN s.enrichment_status = 'not_found' THEN 'nobody found'
                WHEN s.enrichment_status = 'enriched' AND s.email IS NULL THEN 'found without an email'
                WHEN v.result IS NOT NULL AND v.result <> 'valid' THEN 'email ' || v.result END,
           CASE WHEN s.enrichment_status NOT IN ('enriched', 'not_found') THEN 'slots_created' ELSE 'contact_enriched' END,
           CASE WHEN s.enrichment_status NOT IN ('enriched', 'not_found') THEN m.id ELSE s.id END,
           greatest(s.created_at, s.enriched_at, v.verified_at, c.failed_at),
           coalesce(s.enriched_at, s.created_at),
           c.leased_until, c.last_error
    FROM marketing.company_slots s
    JOIN marketing.company_master m ON m.id = s.company_id
    LEFT JOIN LATERAL (
        SELECT ev.result, ev.verified_at FROM marketing.email_verification ev
        WHERE ev.slot_id = s.id AND ev.email = s.email
        ORDER BY ev.verified_at DESC, ev.id DESC LIMIT 1
    ) v ON true
    LEFT JOIN pipeline.service_calls c
        ON c.slot_id = s.id
       AND c.stage = CASE WHEN s.enrichment_status NOT IN ('enriched', 'not_found') THEN 'enrichment' ELSE 'verification' END
), tracked AS (
    -- Each row with its stage's open and dead events, and whether its stage
    -- event may have been answered 2xx with nothing recorded: recent, not at
    -- an end, no event open or dead for it, no service call out.
    SELECT i.*, e.open, e.dead_id, e.dead_error, e.dead_at, e.open_id, e.failing_error,
           i.stage_no < 7 AND i.ended IS NULL AND e.open IS NOT TRUE AND e.dead_id IS NULL
               AND (i.leased_until IS NULL OR i.leased_until <= now())
               AND i.since >= now() - pipeline._setting('stuck_after', '1h')::interval AS may_be_answered
    FROM items i
    LEFT JOIN stage_events e ON e.event_type = i.event_type AND e.row_id = i.event_row_id
), unanswered AS (
    -- Of them, those that got to their stage recently too.
    SELECT t.event_type, t.event_row_id, t.entered
    FROM tracked t
    WHERE t.may_be_answered AND t.entered >= now() - pipeline._setting('stuck_after', '1h')::interval
), bulk AS (
    -- Whether they are many (more than 20): then answered_since finds them,
    -- else each is looked up alone.
    SELECT count(*) > 20 AS many FROM unanswered
), answered_since AS MATERIALIZED (
    -- For many of them (a bulk import whose events were all delivered), one
    -- pass over the processed stage events written since the first of them
    -- got there, by row; a look-up per row would read those events once
    -- per row (10 minutes for 100,000 rows).
    -- NB: the first condition is implied by the second (the rows of
    -- unanswered got there within stuck_after) but, unlike it, can be
    -- estimated: with a subquery alone the planner priced a third of the
    -- history, the view's estimate passed jit_above_cost, and reading it
    -- took 170 ms of JIT instead of 3 ms beside 20 million events
    -- (bin/bench --only history).
    SELECT pe.event_type::text AS event_type, pipeline._event_row_id(pe.event_type, pe.payload) AS row_id,
           max(pe.created_at) AS last_at,
           (array_agg(pe.id ORDER BY pe.created_at DESC, pe.id DESC))[1] AS id
    FROM marketing.pipeline_events pe
    WHERE pe.created_at >= now() - pipeline._setting('stuck_after', '1h')::interval
      AND pe.created_at >= (SELECT min(u.entered) FROM unanswered u WHERE (SELECT b.many FROM bulk b))
      AND pe.status = 'processed'
      AND pe.event_type IN ('company_created', 'company_validated', 'company_promoted', 'slots_created',
                            'contact_enriched')
    GROUP BY 1, 2
), looked_up AS (
    -- The rows answered_since does not cover, to be looked up one by one:
    -- those that got to their stage long ago (and moved since, by a failed
    -- service call), or all of them when they are few; once per distinct
    -- stage event, row and time they got there.
    -- NB: handed over as arrays: the planner prices what unnest gives at
    -- 100 rows whatever they hold, where a look-up joined to every tracked
    -- row was priced for each of them (it cannot see that the gate above
    -- turns most of them away), and after a bulk import of 10,000 rows the
    -- view passed jit_optimize_above_cost: 1.4 s of JIT for a 0.2 s read.
    SELECT array_agg(g.event_type) AS event_types, array_agg(g.event_row_id) AS row_ids,
           array_agg(g.entered) AS entered
    FROM (SELECT DISTINCT t.event_type, t.event_row_id, t.entered
          FROM tracked t
          WHERE t.may_be_answered
            AND (t.entered < now() - pipeline._setting('stuck_after', '1h')::interval
                 OR NOT (SELECT b.many FROM bulk b))) g
), answered_alone AS MATERIALIZED (
    SELECT l.event_type, l.row_id, l.entered, last.id
    FROM looked_up
    CROSS JOIN LATERAL unnest(looked_up.event_types, looked_up.row_ids, looked_up.entered)
        AS l(event_type, row_id, entered)
    CROSS JOIN LATERAL (
        SELECT pe.id FROM marketing.pipeline_events pe
        WHERE pe.created_at >= l.entered AND pe.event_type = l.event_type AND pe.status = 'processed'
          AND pipeline._event_row_id(pe.event_type, pe.payload) = l.row_id
        ORDER BY pe.id DESC
        LIMIT 1
    ) last
)
SELECT i.intake_id, i.company_id, i.slot_id, i.company, i.domain, i.slot_role, i.stage_no, st.stage,
       CASE WHEN i.ended IS NOT NULL THEN 'failed'
            WHEN i.stage_no = 7 THEN 'done'
            WHEN i.open OR i.leased_until > now() THEN 'in_progress'
            WHEN i.dead_id IS NOT NULL AND i.dead_at >= i.entered THEN 'stuck'
            WHEN answered.id IS NOT NULL THEN 'stuck'
            WHEN i.since < now() - pipeline._setting('stuck_after', '1h')::interval THEN 'stuck'
            ELSE 'in_progress' END AS state,
       CASE WHEN i.ended IS NOT NULL THEN i.ended
            WHEN i.stage_no = 7 THEN NULL
            WHEN i.open OR i.leased_until > now() THEN coalesce(i.call_error, i.failing_error)
            WHEN i.dead_id IS NOT NULL AND i.dead_at >= i.entered
                THEN format('%s event %s is dead: %s', i.event_type, i.dead_id, coalesce(i.call_error, i.dead_error))
            WHEN answered.id IS NOT NULL
                THEN format('%s event %s was answered 2xx, but its work is not recorded%s', i.event_type, answered.id,
                            coalesce(' (the last failure: ' || i.call_error || ')', ''))
            WHEN i.call_error IS NOT NULL THEN i.call_error
            WHEN w.event_type IS NULL THEN format('no endpoint is registered for %s', i.event_type)
            WHEN NOT w.enabled THEN format('the endpoint of %s is disabled: %s', i.event_type,
                                           coalesce(w.disabled_reason, 'no reason given'))
            ELSE format('no %s event waits or fails for it, and it has not moved since %s', i.event_type, i.since)
       END AS reason,
       CASE WHEN i.ended IS NOT NULL THEN i.ended_kind
            WHEN i.stage_no = 7 OR i.open OR i.leased_until > now() THEN NULL
            WHEN i.dead_id IS NOT NULL AND i.dead_at >= i.entered THEN 'event dead'
            WHEN answered.id IS NOT NULL THEN 'answered 2xx, nothing recorded'
            WHEN i.since >= now() - pipeline._setting('stuck_after', '1h')::interval THEN NULL
            WHEN i.call_error IS NOT NULL THEN 'service failure'
            WHEN w.event_type IS NULL THEN 'no endpoint'
            WHEN NOT w.enabled THEN 'endpoint disabled'
            ELSE 'not moving'
       END AS reason_kind,
       i.event_type AS waiting_for,
       coalesce(i.open_id, i.dead_id, answered.id) AS event_id,
       i.since
FROM tracked i
JOIN pipeline.stages st ON st.stage_no = i.stage_no
-- A receiver answered 2xx for the row's stage event but recorded nothing
-- (n8n answers 200 while it starts up): stuck at once, not after
-- pipeline.stuck_after. Looked for only while the row is recent (older
-- ones are stuck anyway), among the events written since it got there:
-- from answered_since for many rows that got there recently, else row by
-- row (answered_alone: a row that got there long ago and moved since, by a
-- failed service call, is looked up alone: a pass from then would read all
-- history since).
LEFT JOIN answered_since a
       ON i.may_be_answered AND a.event_type = i.event_type AND a.row_id = i.event_row_id AND a.last_at >= i.entered
-- NB: the same condition as looked_up's, so that a row that shares its
-- event, row id and time with one looked up (two slots of a company) but is
-- not itself waiting for an answer gets none.
LEFT JOIN answered_alone aa
       ON i.may_be_answered
      AND (i.entered < now() - pipeline._setting('stuck_after', '1h')::interval OR NOT (SELECT b.many FROM bulk b))
      AND aa.event_type = i.event_type AND aa.row_id = i.event_row_id AND aa.entered = i.entered
CROSS JOIN LATERAL (SELECT coalesce(aa.id, a.id) AS id) answered
LEFT JOIN pipeline.webhooks w ON w.event_type = i.event_type;
COMMENT ON VIEW marketing.vw_work_progress IS
    'Every company without slots and every slot: the stage it is at, its state (in_progress, done, failed, stuck), '
    'why (the reason it ended or is stuck, and its kind in the pipeline''s words), the event it waits for and '
    'since when it has not moved.';

CREATE VIEW marketing.vw_stuck_work AS
SELECT p.intake_id, p.company_id, p.slot_id, p.company, p.domain, p.slot_role, p.stage_no, p.stage, p.reason,
       p.waiting_for, p.event_id, p.since, now() - p.since AS stuck_for
FROM marketing.vw_work_progress p
WHERE p.state = 'stuck';
COMMENT ON VIEW marketing.vw_stuck_work IS
    'Companies and slots that are not at an end state, have no event waiting or failing for them and have not '
    'moved for pipeline.stuck_after (or whose last event is dead), with why. pipeline.resume_company sets one '
    'moving again.';

-- How many companies reached each stage (and, from stage 4 on, how many
-- contacts), and the work of each stage (companies up to stage 4, contacts
-- from 5 on): arrived, in progress, done (the stage's work is recorded:
-- companies or contacts), failed (ended there) and stuck, with how often
-- each kind of reason came (vw_work_progress.reason_kind: the pipeline's
-- words, no company's data: monitoring roles read the funnel).
-- arrived = done + in_progress + failed + stuck.
CREATE VIEW marketing.vw_pipeline_funnel AS
WITH counts (stage_no, companies, contacts) AS (
    SELECT 1, (SELECT count(*) FROM intake.company_raw_intake), NULL::bigint
    UNION ALL
    SELECT 2, (SELECT count(*) FROM intake.company_raw_intake WHERE validated), NULL
    UNION ALL
    SELECT 3, (SELECT count(*) FROM marketing.company_master), NULL
    UNION ALL
    SELECT 4, count(DISTINCT company_id), count(*) FROM marketing.company_slots
    UNION ALL
    SELECT 5, count(DISTINCT company_id), count(*)
    FROM marketing.company_slots WHERE enrichment_status = 'enriched'
    UNION ALL
    SELECT 6, count(DISTINCT s.company_id), count(DISTINCT s.id)
    FROM marketing.company_slots s
    WHERE EXISTS (SELECT 1 FROM marketing.email_verification v WHERE v.slot_id = s.id)
    UNION ALL
    SELECT 7, count(DISTINCT company_id), count(*) FROM marketing.vw_outreach_ready
), progress AS MATERIALIZED (
    SELECT p.stage_no, p.state, p.reason_kind FROM marketing.vw_work_progress p
), states AS (
    SELECT p.stage_no,
           count(*) FILTER (WHERE p.state = 'in_progress') AS in_progress,
           count(*) FILTER (WHERE p.state = 'failed') AS failed,
           count(*) FILTER (WHERE p.state = 'stuck') AS stuck
    FROM progress p
    GROUP BY p.stage_no
), reasons AS (
    SELECT r.stage_no, jsonb_object_agg(r.reason, r.n) AS failure_reasons
    FROM (SELECT p.stage_no, p.reason_kind AS reason, count(*) AS n
          FROM progress p WHERE p.state IN ('failed', 'stuck') GROUP BY 1, 2) r
    GROUP BY r.stage_no
)
SELECT st.stage_no, st.stage, st.event_type, c.companies, c.contacts,
       CASE WHEN st.stage_no <= 4 THEN c.companies ELSE c.contacts END
           + coalesce(s.in_progress, 0) + coalesce(s.failed, 0) + coalesce(s.stuck, 0) AS arrived,
       coalesce(s.in_progress, 0) AS in_progress,
       CASE WHEN st.stage_no <= 4 THEN c.companies ELSE c.contacts END AS done,
       coalesce(s.failed, 0) AS failed,
       coalesce(s.stuck, 0) AS stuck,
       coalesce(r.failure_reasons, '{}') AS failure_reasons
FROM pipeline.stages st
JOIN counts c USING (stage_no)
LEFT JOIN states s USING (stage_no)
LEFT JOIN reasons r USING (stage_no)
ORDER BY st.stage_no;
COMMENT ON VIEW marketing.vw_pipeline_funnel IS
    'The seven stages with the number of companies that reached each (and of contacts, from slots on), and the '
    'work at each: in progress, done, failed (ended there; failure_reasons counts each reason) and stuck.';

-- Sets a company moving again from where it stopped: for each of its work
-- items that is neither done nor ended and has no event waiting or failing,
-- the event of the stage it is at is written again (pipeline.emit, so the
-- caller needs the right to produce it), shaped as the stage's trigger
-- writes it. Finished and paid work is not redone: the stage functions skip
-- what is recorded (pipeline.enrichment_calls and verification_calls do
-- not call a service for a slot that is filled or an address verified).
-- Replaying the company's dead events (pipeline.replay) is the other way.
-- Give the intake row or, for a company entered by hand, the company id.
CREATE FUNCTION pipeline.resume_company(intake_id bigint DEFAULT NULL, company_id bigint DEFAULT NULL)
RETURNS TABLE (stage text, event_type text, event_id bigint, detail text)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_item    record;
    v_payload jsonb;
    v_done    boolean := false;
BEGIN
    IF (resume_company.intake_id IS NULL) = (resume_company.company_id IS NULL) THEN
        RAISE EXCEPTION 'pipeline.resume_company: give intake_id or company_id (one of them)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR v_item IN
        SELECT p.* FROM marketing.vw_work_progress p
        WHERE (p.intake_id = resume_company.intake_id OR p.company_id = resume_company.company_id)
        ORDER BY p.stage_no, p.slot_id
    LOOP
        v_done := true;
        IF v_item.state IN ('done', 'failed') THEN
            RETURN QUERY SELECT v_item.stage, NULL::text, NULL::bigint,
                                format('%s: %s', v_item.state, coalesce(v_item.reason, 'outreach ready'));
            CONTINUE;
        END IF;
        IF EXISTS (SELECT 1 FROM marketing.pipeline_events e
                   WHERE e.event_type = v_item.waiting_for AND e.status IN ('pending', 'processing', 'failed')
                     AND pipeline._event_row_id(e.event_type, e.payload)
                         = CASE WHEN v_item.waiting_for IN ('company_created', 'company_validated') THEN v_item.intake_id
                                WHEN v_item.waiting_for IN ('company_promoted', 'slots_created') THEN v_item.company_id
                                ELSE v_item.slot_id END) THEN
            RETURN QUERY SELECT v_item.stage, v_item.waiting_for, NULL::bigint,
                                'moving already: an event waits or is being delivered';
            CONTINUE;
        END IF;
        -- slots_created carries all the company's slots that wait for
        -- enrichment at once: written for the first of them only.
        IF v_item.waiting_for = 'slots_created' AND EXISTS (
               SELECT 1 FROM marketing.company_slots s
               WHERE s.company_id = v_item.company_id AND s.id < v_item.slot_id
                 AND s.enrichment_status NOT IN ('enriched', 'not_found')) THEN
            CONTINUE;
        END IF;
        v_payload := CASE v_item.waiting_for
            WHEN 'company_created' THEN
                (SELECT jsonb_build_object('new', to_jsonb(r)) FROM intake.company_raw_intake r WHERE r.id = v_item.intake_id)
            WHEN 'company_validated' THEN
                (SELECT jsonb_build_object('new', to_jsonb(r), 'old', to_jsonb(r))
                 FROM intake.company_raw_intake r WHERE r.id = v_item.intake_id)
            WHEN 'company_promoted' THEN
                (SELECT jsonb_build_object('new', to_jsonb(m)) FROM marketing.company_master m WHERE m.id = v_item.company_id)
            WHEN 'slots_created' THEN
                (SELECT jsonb_build_object('key', jsonb_build_object('company_id', v_item.company_id), 'count', count(*),
                                           'new', jsonb_agg(to_jsonb(s) ORDER BY s.id))
                 FROM marketing.company_slots s
                 WHERE s.company_id = v_item.company_id AND s.enrichment_status NOT IN ('enriched', 'not_found'))
            ELSE
                (SELECT jsonb_build_object('new', to_jsonb(s), 'old', to_jsonb(s))
                 FROM marketing.company_slots s WHERE s.id = v_item.slot_id)
        END;
        RETURN QUERY SELECT v_item.stage, v_item.waiting_for, pipeline.emit(v_item.waiting_for, v_payload),
                            format('written again (%s)', coalesce(v_item.reason, 'in progress, not moving'));
    END LOOP;
    IF NOT v_done THEN
        RAISE EXCEPTION 'pipeline.resume_company: no company with %', CASE WHEN intake_id IS NOT NULL
            THEN format('intake_id %s', intake_id) ELSE format('company_id %s', company_id) END
            USING ERRCODE = 'no_data_found';
    END IF;
END
$$;
COMMENT ON FUNCTION pipeline.resume_company(bigint, bigint) IS
    'Sets a company (by intake_id, or company_id for one entered by hand) moving again from the stage where it '
    'stopped: writes that stage''s event again for each of its work items that is not done, not ended and not '
    'moving. Finished and paid work is not redone. Returns what it did per item.';

-- Resumes every stuck company (at most max_companies); returns what was done.
CREATE FUNCTION pipeline.resume_stuck(max_companies integer DEFAULT 100)
RETURNS TABLE (intake_id bigint, company_id bigint, stage text, event_type text, event_id bigint, detail text)
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    SELECT s.intake_id, s.company_id, r.stage, r.event_type, r.event_id, r.detail
    FROM (SELECT DISTINCT w.intake_id, CASE WHEN w.intake_id IS NULL THEN w.company_id END AS company_id
          FROM marketing.vw_stuck_work w
          ORDER BY 1, 2
          LIMIT max_companies) s
    CROSS JOIN LATERAL pipeline.resume_company(s.intake_id, s.company_id) r
$$;
COMMENT ON FUNCTION pipeline.resume_stuck(integer) IS
    'pipeline.resume_company for every stuck company (marketing.vw_stuck_work), at most max_companies.';

-- NB: not to pg_monitor: the rows name companies, addresses and what
-- receivers answered. Monitoring reads the counts (pipeline.status(), the
-- funnel).


-- ==== from sql/013_delivery.sql ====

-- The attempt log: no foreign key (attempts go with their events through
-- the triggers below), and refused deliveries. Its 0.1.0 table is the
-- first partition (see 003_events.sql above).
ALTER TABLE marketing.pipeline_delivery_attempts_0
    DROP CONSTRAINT outcome_known,
    ADD CONSTRAINT outcome_known CHECK (outcome IN ('delivered', 'retry', 'failed', 'gone', 'rejected', 'refused'));

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
SELECT setval(pg_get_serial_sequence('marketing.pipeline_delivery_attempts', 'id'),
              current_setting('pipeline_upgrade.pipeline_delivery_attempts_next_id')::bigint, false);

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
-- ==== from sql/014_verify.sql ====

-- 014_verify.sql: a self-check of the installation (last, so that it can
-- look at every object).
--
-- SELECT * FROM pipeline.verify() lists every object the pipeline needs with
-- ok or what is wrong; SELECT * FROM pipeline.verify() WHERE status <> 'ok'
-- is empty on a healthy install. It works the same in trigger-only mode.

CREATE FUNCTION pipeline.verify()
RETURNS TABLE (kind text, name text, status text)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
WITH expected (kind, name) AS (
    VALUES ('schema', 'intake'), ('schema', 'marketing'), ('schema', 'pipeline'),
           ('table', 'intake.company_raw_intake'),
           ('table', 'marketing.company_master'),
           ('table', 'marketing.company_slots'),
           ('table', 'marketing.email_verification'),
           ('table', 'marketing.pipeline_events'),
           ('table', 'marketing.pipeline_error_log'),
           ('table', 'pipeline.watches'),
           ('table', 'pipeline.stages'),
           ('table', 'pipeline.webhooks'),
           ('table', 'marketing.pipeline_delivery_attempts'),
           ('table', 'pipeline.settled_below'),
           ('view', 'marketing.vw_outreach_ready'),
           ('view', 'marketing.vw_pipeline_funnel'),
           ('view', 'marketing.vw_pending_events'),
           ('view', 'marketing.vw_processing_latency'),
           ('view', 'marketing.vw_unresolved_errors'),
           ('view', 'marketing.vw_error_rate_24h'),
           ('view', 'marketing.vw_endpoint_health'),
           ('function', 'pipeline._capture'),
           ('function', 'pipeline.watch'),
           ('function', 'pipeline.unwatch'),
           ('function', 'pipeline.emit'),
           ('function', 'pipeline.claim'),
           ('function', 'pipeline.mark_delivered'),
           ('function', 'pipeline.mark_delivered_many'),
           ('function', 'pipeline.mark_failed'),
           ('function', 'pipeline.replay'),
           ('function', 'pipeline.replay_many'),
           ('function', 'pipeline.replay_failed'),
           ('function', 'pipeline.log_error'),
           ('function', 'pipeline.resolve_error'),
           ('function', 'pipeline.resolve_errors'),
           ('function', 'pipeline.register_webhook'),
           ('function', 'pipeline.update_webhook'),
           ('function', 'pipeline.disable_webhook'),
           ('function', 'pipeline.enable_webhook'),
           ('function', 'pipeline.remove_webhook'),
           ('function', 'pipeline.import_registry'),
           ('function', 'pipeline.export_registry'),
           ('function', 'pipeline.purge'),
           ('function', 'pipeline.status'),
           ('function', 'pipeline.release_claims'),
           ('function', 'pipeline.grant_event_type'),
           ('function', 'pipeline.revoke_event_type'),
           ('table', 'pipeline.event_type_grants'),
           ('table', 'pipeline.webhook_credentials'),
           ('table', 'pipeline.endpoint_health'),
           ('table', 'pipeline.domain_locks'),
           ('view', 'marketing.vw_pipeline_status'),
           ('table', 'pipeline.services'),
           ('table', 'pipeline.service_calls'),
           ('table', 'pipeline.undelivered_types'),
           ('view', 'marketing.vw_work_progress'),
           ('view', 'marketing.vw_stuck_work'),
           ('view', 'pipeline.services_in_effect'),
           ('function', 'pipeline.set_service'),
           ('function', 'pipeline.enrichment_calls'),
           ('function', 'pipeline.verification_calls'),
           ('function', 'pipeline.finish_call'),
           ('function', 'pipeline.stage_answer'),
           ('function', 'pipeline.resume_company'),
           ('function', 'pipeline.resume_stuck')
),
objects AS (
    SELECT x.kind, x.name,
           CASE x.kind
               WHEN 'schema' THEN
                   CASE WHEN to_regnamespace(x.name) IS NULL THEN 'missing' ELSE 'ok' END
               WHEN 'function' THEN
                   CASE WHEN EXISTS (
                       SELECT 1 FROM pg_proc p
                       WHERE p.pronamespace = to_regnamespace(split_part(x.name, '.', 1))
                         AND p.proname = split_part(x.name, '.', 2))
                   THEN 'ok' ELSE 'missing' END
               ELSE
                   (SELECT CASE
                               WHEN r.relkind IS NULL THEN 'missing'
                               WHEN r.relkind IN ('r', 'p') AND x.kind = 'table' THEN 'ok'
                               WHEN r.relkind = 'v' AND x.kind = 'view' THEN 'ok'
                               ELSE 'not a ' || x.kind
                           END
                    FROM (SELECT (SELECT c.relkind FROM pg_class c
                                  WHERE c.oid = to_regclass(x.name)) AS relkind) r)
           END AS status
    FROM expected x
),
-- Every stage trigger, and every watch a user added.
wanted_triggers AS (
    SELECT s.source_table::text AS table_name,
           format('pipeline_%s_%s', s.event_type, lower(s.operation)) AS trigger_name,
           true AS stage
    FROM pipeline.stages s
    WHERE s.event_type IS NOT NULL
    UNION
    SELECT w.source_table::text, w.trigger_name::text, w.builtin
    FROM pipeline.watches w
),
triggers AS (
    SELECT 'trigger'::text AS kind,
           wt.table_name || '.' || wt.trigger_name AS name,
           CASE
               WHEN to_regclass(wt.table_name) IS NULL THEN 'missing table'
               WHEN t.oid IS NULL THEN 'missing'
               WHEN t.tgenabled = 'D' THEN 'disabled'
               WHEN CASE WHEN wt.stage THEN t.tgfoid <> 'pipeline._capture_stage()'::regprocedure
                         ELSE t.tgfoid NOT IN ('pipeline._capture_sealed()'::regprocedure,
                                               'pipeline._capture()'::regprocedure)
                    END THEN 'calls another function'
               ELSE 'ok'
           END AS status
    FROM wanted_triggers wt
    LEFT JOIN pg_trigger t
           ON t.tgrelid = to_regclass(wt.table_name) AND t.tgname = wt.trigger_name
)
SELECT kind, name, status FROM objects
UNION ALL
(SELECT kind, name, status FROM triggers ORDER BY name)
UNION ALL
-- An endpoint restored from a dump has no credentials until they are
-- imported; a disabled one says why; one that fails every request says
-- since when, and when it is given up unless it answers.
(SELECT 'endpoint', w.event_type::text,
        CASE WHEN c.event_type IS NULL THEN 'missing credentials (import them with pipeline.import_registry)'
             WHEN NOT w.enabled THEN 'disabled: ' || coalesce(w.disabled_reason, 'no reason given')
             WHEN h.failing_since IS NOT NULL THEN
                 format('failing since %s (the last: %s)', h.failing_since, coalesce(h.last_failure, 'no answer'))
                 || CASE WHEN pipeline._setting('disable_after', '3d')::interval > interval '0'
                         THEN format('; given up at %s unless it answers',
                                     h.failing_since + pipeline._setting('disable_after', '3d')::interval)
                         ELSE '' END
             ELSE 'ok' END
 FROM pipeline.webhooks w
 LEFT JOIN pipeline.webhook_credentials c ON c.event_type = w.event_type
 LEFT JOIN pipeline.endpoint_health h ON h.event_type = w.event_type
 ORDER BY 2)
UNION ALL
-- The event history's partitions (015_partitions.sql): events are written
-- to the newest one; the deliverers' purge keeps one made ahead of it.
-- NB: reads only the events' ids, which every role may.
SELECT 'partitions', 'marketing.pipeline_events',
       CASE WHEN p.newest IS NULL THEN 'none: writes of events fail until pipeline.purge (by a deliverer or the owner) makes one'
            WHEN EXISTS (SELECT FROM marketing.pipeline_events e WHERE e.id >= p.newest * 68719476736)
            THEN format('none made ahead of partition %s, where events are written now: a deliverer with EXECUTE '
                        'on pipeline._maintain_partitions makes the next one (docs/data-model.md#partitions)', p.newest)
            ELSE 'ok' END
FROM (SELECT max(substr(c.relname, 17)::bigint) AS newest
      FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
      WHERE i.inhparent = 'marketing.pipeline_events'::regclass AND c.relname ~ '^pipeline_events_[0-9]+$') p
UNION ALL
-- Work that stopped where nobody will pick it up again by itself.
SELECT 'work', 'stuck companies and slots',
       CASE WHEN count(*) = 0 THEN 'ok'
            ELSE format('%s stuck (marketing.vw_stuck_work; pipeline.resume_stuck() sets them moving), the oldest since %s: %s',
                        count(*), min(s.since), (array_agg(s.reason ORDER BY s.since))[1]) END
FROM marketing.vw_stuck_work s
$$;

COMMENT ON FUNCTION pipeline.verify() IS
    'Lists every schema, table, view, function and stage trigger the pipeline needs, each endpoint, whether a '
    'partition of the events is made ahead and whether work is stuck, with ok or what is wrong.';

-- ==== from sql/015_partitions.sql (new in 0.2.0; pipeline.purge moved here from 013_delivery.sql) ====

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

-- ==== the watches' triggers ====
--
-- Made again from pipeline.watches as 0.2.0's pipeline.watch() makes them
-- (INSERT and DELETE watches without a condition are statement triggers
-- now), keeping which are the stages' own and when each was made. The
-- upgrading role needs the right to create triggers on each watched table,
-- as pipeline.watch() does.
DO $upgrade$
DECLARE
    v_watch pipeline.watches;
BEGIN
    FOR v_watch IN SELECT * FROM pipeline.watches LOOP
        DELETE FROM pipeline.watches w
        WHERE w.source_table OPERATOR(pg_catalog.=) v_watch.source_table
          AND w.event_type OPERATOR(pg_catalog.=) v_watch.event_type
          AND w.operation OPERATOR(pg_catalog.=) v_watch.operation;
        -- NB: the stage watches' triggers run pipeline._capture_stage().
        PERFORM pipeline._watch(v_watch.source_table, v_watch.event_type, v_watch.operation,
                                v_watch.condition, v_watch.columns, v_watch.group_by, v_watch.builtin);
        UPDATE pipeline.watches w SET builtin = v_watch.builtin, created_at = v_watch.created_at
        WHERE w.source_table OPERATOR(pg_catalog.=) v_watch.source_table
          AND w.event_type OPERATOR(pg_catalog.=) v_watch.event_type
          AND w.operation OPERATOR(pg_catalog.=) v_watch.operation;
    END LOOP;
END
$upgrade$;

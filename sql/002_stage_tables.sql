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

CREATE TABLE intake.company_raw_intake (
    id                bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    company           text NOT NULL,
    website           text,
    import_batch_id   text,
    source            text,
    industry          text,
    employee_count    integer,
    city              text,
    state             text,
    country           text,
    linkedin_url      text,
    raw               jsonb NOT NULL DEFAULT '{}',
    validated         boolean NOT NULL DEFAULT false,
    validation_status text NOT NULL DEFAULT 'pending',
    validation_errors text[] NOT NULL DEFAULT '{}',
    validated_at      timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT company_not_blank CHECK (NOT pipeline._is_blank(company)),
    CONSTRAINT company_max_500_chars CHECK (char_length(company) <= 500),
    CONSTRAINT company_no_control_chars CHECK (company !~ '[\x01-\x1f\x7f]'),
    CONSTRAINT website_max_2048_chars CHECK (char_length(website) <= 2048),
    CONSTRAINT import_batch_id_max_200_chars CHECK (char_length(import_batch_id) <= 200),
    CONSTRAINT employee_count_not_negative CHECK (employee_count >= 0),
    CONSTRAINT validation_status_known
        CHECK (validation_status IN ('pending', 'valid', 'invalid')),
    CONSTRAINT validated_means_valid CHECK (NOT validated OR validation_status = 'valid')
);
CREATE INDEX company_raw_intake_batch_idx ON intake.company_raw_intake (import_batch_id);

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

CREATE TABLE marketing.company_master (
    id             bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    intake_id      bigint UNIQUE REFERENCES intake.company_raw_intake (id) ON DELETE SET NULL,
    company_name   text NOT NULL,
    website        text NOT NULL,
    domain         text GENERATED ALWAYS AS (pipeline.website_domain(website)) STORED,
    industry       text,
    employee_count integer,
    city           text,
    state          text,
    country        text,
    linkedin_url   text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT company_name_not_blank CHECK (NOT pipeline._is_blank(company_name)),
    CONSTRAINT company_name_max_500_chars CHECK (char_length(company_name) <= 500),
    CONSTRAINT website_is_http_url CHECK (pipeline._is_http_url(website)),
    CONSTRAINT employee_count_not_negative CHECK (employee_count >= 0),
    CONSTRAINT company_master_domain_key UNIQUE (domain)
);

COMMENT ON TABLE marketing.company_master IS
    'Stage 3. Validated companies, one per domain. INSERT emits company_promoted.';
COMMENT ON COLUMN marketing.company_master.intake_id IS 'The intake row this company was promoted from (NULL if entered by hand).';
COMMENT ON COLUMN marketing.company_master.website IS 'Normalised http(s) URL of the company website.';
COMMENT ON COLUMN marketing.company_master.domain IS 'Host of the website in one spelling (pipeline.website_domain: lower case, no www., no trailing dot, punycode); '
    'unique, so a company is promoted once.';

CREATE TABLE marketing.company_slots (
    id                bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    company_id        bigint NOT NULL REFERENCES marketing.company_master (id) ON DELETE CASCADE,
    slot_role         text NOT NULL,
    full_name         text,
    title             text,
    email             text,
    linkedin_url      text,
    phone             text,
    enrichment_status text NOT NULL DEFAULT 'pending',
    enrichment_source text,
    enriched_at       timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT slot_role_format CHECK (slot_role ~ '^[a-z][a-z0-9_]{0,31}$'),
    CONSTRAINT enrichment_status_known
        CHECK (enrichment_status IN ('pending', 'in_progress', 'enriched', 'not_found', 'failed')),
    CONSTRAINT enriched_has_contact
        CHECK (enrichment_status <> 'enriched' OR full_name IS NOT NULL OR email IS NOT NULL),
    CONSTRAINT email_format CHECK (pipeline._is_email(email)),
    CONSTRAINT company_slots_company_role_key UNIQUE (company_id, slot_role)
);

COMMENT ON TABLE marketing.company_slots IS
    'Stage 4-5. One row per role slot of a company and the contact who fills it. '
    'INSERT emits one slots_created per company per statement; enrichment_status becoming enriched emits contact_enriched.';
COMMENT ON COLUMN marketing.company_slots.slot_role IS 'The role to fill: lower-case identifier such as ceo, cfo, hr.';
COMMENT ON COLUMN marketing.company_slots.enrichment_status IS
    'pending, in_progress, enriched, not_found or failed. enriched needs a name or an email.';

CREATE TABLE marketing.email_verification (
    id          bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    slot_id     bigint NOT NULL REFERENCES marketing.company_slots (id) ON DELETE CASCADE,
    email       text NOT NULL,
    result      text NOT NULL,
    provider    text,
    score       numeric(5, 2),
    details     jsonb NOT NULL DEFAULT '{}',
    verified_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT email_format CHECK (pipeline._is_email(email)),
    CONSTRAINT result_known CHECK (result IN ('valid', 'invalid', 'risky', 'catch_all', 'unknown')),
    CONSTRAINT score_0_to_100 CHECK (score BETWEEN 0 AND 100)
);
CREATE INDEX email_verification_slot_idx ON marketing.email_verification (slot_id, verified_at DESC, id DESC);

COMMENT ON TABLE marketing.email_verification IS
    'Stage 6. Every verification of a contact email; the newest per slot counts. INSERT emits email_verified.';
COMMENT ON COLUMN marketing.email_verification.result IS 'valid, invalid, risky, catch_all or unknown. Only valid makes a contact outreach ready.';
COMMENT ON COLUMN marketing.email_verification.score IS 'The verifier''s confidence, 0-100, when it gives one.';

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

CREATE TABLE pipeline.webhooks (
    event_type      pipeline.event_type PRIMARY KEY,
    url             text NOT NULL,
    method          text NOT NULL DEFAULT 'POST',
    timeout_ms      integer,
    max_in_flight   integer,
    enabled         boolean NOT NULL DEFAULT true,
    disabled_reason text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    confirm_header  text,
    CONSTRAINT url_valid CHECK (pipeline._url_problem(url) IS NULL),
    CONSTRAINT method_known CHECK (method IN ('POST', 'PUT', 'PATCH')),
    CONSTRAINT timeout_ms_range CHECK (timeout_ms BETWEEN 1 AND 900000),
    CONSTRAINT max_in_flight_range CHECK (max_in_flight BETWEEN 1 AND 1000),
    CONSTRAINT confirm_header_is_a_header_name CHECK (confirm_header ~ '^[A-Za-z0-9!#$%&''*+.^_`|~-]{1,100}$'),
    CONSTRAINT disabled_has_reason CHECK (enabled OR disabled_reason IS NOT NULL)
);
COMMENT ON TABLE pipeline.webhooks IS
    'Where events are delivered: one endpoint per event type (its headers and secret are in pipeline.webhook_credentials).';
COMMENT ON COLUMN pipeline.webhooks.timeout_ms IS
    'Request timeout (at most 15 minutes: a receiver that calls slow services); NULL uses pipeline.http_timeout.';
COMMENT ON COLUMN pipeline.webhooks.max_in_flight IS 'At most this many deliveries to the endpoint at once; NULL: pipeline.concurrency.';
COMMENT ON COLUMN pipeline.webhooks.confirm_header IS
    'A response header the receiver sets when its work is done: a 2xx without it (a proxy''s page, n8n answering '
    '200 while it starts up) is not taken as delivered, but retried. NULL: any 2xx is delivered.';
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

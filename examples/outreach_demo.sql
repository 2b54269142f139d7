-- The outreach pipeline at work, as bin/run shows it: sample companies go
-- into intake, and the deliverer (the extension's worker, or pipeline-relay
-- with bin/run --trigger-only) carries each stage's event to the stage
-- runner (the five n8n workflows' stand-in), whose writes fire the next
-- stage. Needs a deliverer running, the registry imported and the receivers
-- running; bin/run does all that.
\set ON_ERROR_STOP on
\pset footer off

\echo
\echo '== 1. intake: 25 companies arrive (3 with a website that is not a URL, 5 as bare domains) =='
INSERT INTO intake.company_raw_intake (company, website, import_batch_id, industry, city, state)
SELECT b.name || ' ' || (n + 4) / 5,
       CASE WHEN n % 8 = 0 THEN 'see linkedin'
            WHEN n % 5 = 3 THEN lower(replace(b.name, ' ', '-')) || '-' || (n + 4) / 5 || '.example'
            ELSE 'https://www.' || lower(replace(b.name, ' ', '-')) || '-' || (n + 4) / 5 || '.example' END,
       'demo', b.industry, b.city, b.state
FROM generate_series(1, 25) AS n
JOIN (VALUES (0, 'Acme Rockets', 'aerospace', 'Tucson', 'AZ'),
             (1, 'Globex', 'energy', 'Cypress Creek', 'OR'),
             (2, 'Initech', 'software', 'Austin', 'TX'),
             (3, 'Umbrella', 'pharma', 'Raccoon City', 'MO'),
             (4, 'Hooli', 'software', 'Palo Alto', 'CA')) AS b(i, name, industry, city, state)
  ON b.i = n % 5;

\echo '== the first events, right after the insert =='
SELECT id, event_type, status, source_key FROM marketing.pipeline_events ORDER BY id LIMIT 5;

\echo '== waiting for the cascade (validate, promote, create slots, enrich, verify) =='
DO $$
DECLARE
    deadline timestamptz := clock_timestamp() + interval '60 seconds';
BEGIN
    LOOP
        EXIT WHEN NOT EXISTS (
            SELECT 1 FROM marketing.pipeline_events
            WHERE status IN ('pending', 'processing', 'failed') AND event_type <> 'email_verified');
        IF clock_timestamp() > deadline THEN
            RAISE WARNING 'the cascade did not finish within 60 seconds';
            EXIT;
        END IF;
        PERFORM pg_sleep(0.1);
        -- NB: a new snapshot each time round: this DO block is one statement.
        COMMIT;
    END LOOP;
END
$$;

\echo '== each of the seven stages: reached, and the work that arrived there (in progress, done, failed, stuck) =='
SELECT stage_no, stage, companies, contacts, arrived, in_progress, done, failed, stuck, failure_reasons
FROM marketing.vw_pipeline_funnel;

\echo '== stuck work (none, when every company ended where it should) =='
SELECT intake_id, company, stage, reason FROM marketing.vw_stuck_work;

\echo '== stage 7: some of the outreach-ready contacts =='
SELECT company_name, slot_role, full_name, email FROM marketing.vw_outreach_ready ORDER BY company_id, slot_role LIMIT 6;

\echo '== delivery latency by event type (created -> delivered) =='
SELECT event_type, delivered, avg_ms, p50_ms, p95_ms, max_ms FROM marketing.vw_processing_latency;

\echo '== endpoints =='
SELECT event_type, url, enabled, waiting, delivered_1h, failed_1h, avg_ms_1h FROM marketing.vw_endpoint_health;

\echo '== events by type and status (email_verified is recorded without delivery: the deliverer settles it) =='
SELECT pipeline.purge() IS NOT NULL AS settled;
SELECT event_type, status, count(*) FROM marketing.pipeline_events GROUP BY 1, 2 ORDER BY 1, 2;

\echo '== pipeline.status() =='
SELECT worker_running, last_deliverer, pending, processing, failed, dead, delivered_last_minute,
       failed_last_minute, endpoints_enabled, unresolved_errors, without_endpoint, stuck_work
FROM pipeline.status();

\echo '== self-check: anything not ok? =='
SELECT kind, name, status FROM pipeline.verify() WHERE status <> 'ok';

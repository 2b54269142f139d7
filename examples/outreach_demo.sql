-- The outreach pipeline by hand: what the five receivers will do, played as
-- SQL, with the events each step produces. Run by bin/run; any database with
-- pipeline_ext (or the trigger-only script) installed will do.
\set ON_ERROR_STOP on
\pset footer off
LISTEN pipeline_event;

\echo
\echo '== 1. intake: five companies arrive (one with a bad website) =='
INSERT INTO intake.company_raw_intake (company, website, import_batch_id, industry, city, state) VALUES
    ('Acme Rockets', 'https://acme-rockets.example', 'demo-1', 'aerospace', 'Tucson', 'AZ'),
    ('Globex', 'https://www.globex.example', 'demo-1', 'energy', 'Cypress Creek', 'OR'),
    ('Initech', 'http://initech.example/home', 'demo-1', 'software', 'Austin', 'TX'),
    ('Umbrella Corp', 'https://umbrella.example', 'demo-1', 'pharma', 'Raccoon City', 'MO'),
    ('Nowhere Ltd', 'not a website', 'demo-1', NULL, NULL, NULL);

\echo
\echo '== 2. validation: four pass, one is rejected (no event for it) =='
UPDATE intake.company_raw_intake
SET validated = true, validation_status = 'valid', validated_at = now()
WHERE import_batch_id = 'demo-1' AND website ~ '^https?://';
UPDATE intake.company_raw_intake
SET validation_status = 'invalid', validation_errors = '{"website is not a URL"}'
WHERE import_batch_id = 'demo-1' AND NOT validated;

\echo
\echo '== 3. promotion into marketing.company_master =='
INSERT INTO marketing.company_master (intake_id, company_name, website, industry, city, state)
SELECT id, company, website, industry, city, state
FROM intake.company_raw_intake WHERE import_batch_id = 'demo-1' AND validated;

\echo
\echo '== 4. slots: ceo and cfo for three companies, one statement (one event per company) =='
INSERT INTO marketing.company_slots (company_id, slot_role)
SELECT c.id, r.role
FROM (SELECT id FROM marketing.company_master ORDER BY id LIMIT 3) c
CROSS JOIN (VALUES ('ceo'), ('cfo')) AS r(role);

\echo
\echo '== 5. enrichment: contacts found for the CEOs =='
UPDATE marketing.company_slots s
SET enrichment_status = 'enriched', enriched_at = now(), enrichment_source = 'demo',
    full_name = 'Chief of ' || c.company_name, title = 'Chief Executive Officer',
    email = 'ceo@' || c.domain
FROM marketing.company_master c
WHERE c.id = s.company_id AND s.slot_role = 'ceo';

\echo
\echo '== 6. verification: two valid emails, one risky =='
INSERT INTO marketing.email_verification (slot_id, email, result, score, provider)
SELECT s.id, s.email, CASE WHEN s.company_id = (SELECT max(company_id) FROM marketing.company_slots) THEN 'risky' ELSE 'valid' END,
       90, 'demo'
FROM marketing.company_slots s WHERE s.enrichment_status = 'enriched';

\echo
\echo '== the event queue (newest first) =='
SELECT id, event_type, status, source_table, source_op, source_key,
       left(payload::text, 60) || '...' AS payload
FROM marketing.pipeline_events ORDER BY created_at DESC, id DESC;

\echo '== 7. outreach ready =='
SELECT company_name, slot_role, full_name, email, email_score FROM marketing.vw_outreach_ready ORDER BY company_id;

\echo '== the funnel =='
SELECT * FROM marketing.vw_pipeline_funnel;

\echo '== pending events by type =='
SELECT event_type, pending, processing, failed, due_now FROM marketing.vw_pending_events;

\echo '== an outside consumer: claim everything, deliver all but one, fail that one =='
CREATE TEMP TABLE claimed AS SELECT id, event_type FROM pipeline.claim(100);
SELECT count(*) AS delivered FROM pipeline.mark_delivered_many(
    ARRAY(SELECT id FROM claimed WHERE id <> (SELECT max(id) FROM claimed)));
SELECT pipeline.mark_failed((SELECT max(id) FROM claimed), 'HTTP 503 from /verify-email',
                            details => '{"status_code": 503}') AS outcome;

\echo '== processing latency by type (last 24 hours) =='
SELECT event_type, delivered, avg_ms, p95_ms FROM marketing.vw_processing_latency;

\echo '== errors =='
SELECT id, stage, event_id, event_status, error_message FROM marketing.vw_unresolved_errors;
SELECT stage, events, errors, failed_event_pct FROM marketing.vw_error_rate_24h;

\echo '== self-check: anything not ok? =='
SELECT kind, name, status FROM pipeline.verify() WHERE status <> 'ok';
SELECT count(*) AS objects_checked_ok FROM pipeline.verify() WHERE status = 'ok';

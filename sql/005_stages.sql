-- 005_stages.sql: the seven stages of the outreach pipeline.
--
-- Each stage that emits an event is a row here and a pipeline.watch() of its
-- table, so the stage triggers are made by the same mechanism a user calls.
-- pipeline.verify() compares these rows with the triggers that exist.
--
-- slots_created is grouped: the create-slots receiver inserts all slots of a
-- company in one statement and the enrich-contact receiver wants them as one
-- job, so a statement yields one event per company_id with every new slot in
-- payload.new (and the number of slots in payload.count).

CREATE TABLE pipeline.stages (
    stage_no     smallint PRIMARY KEY,
    stage        text NOT NULL UNIQUE,
    event_type   text UNIQUE,
    source_table regclass,
    operation    text,
    condition    text,
    columns      text[],
    group_by     text,
    description  text NOT NULL
);
COMMENT ON TABLE pipeline.stages IS
    'The seven stages of the outreach pipeline and the watch that emits each stage''s event.';

INSERT INTO pipeline.stages
    (stage_no, stage, event_type, source_table, operation, condition, columns, group_by, description)
VALUES
    (1, 'intake', 'company_created', 'intake.company_raw_intake', 'INSERT', NULL, NULL, NULL,
     'A company arrived in intake.company_raw_intake.'),
    (2, 'validation', 'company_validated', 'intake.company_raw_intake', 'UPDATE',
     'NEW.validated AND OLD.validated IS DISTINCT FROM true', '{validated}', NULL,
     'Validation set validated to true.'),
    (3, 'promotion', 'company_promoted', 'marketing.company_master', 'INSERT', NULL, NULL, NULL,
     'The company was promoted into marketing.company_master.'),
    (4, 'slots', 'slots_created', 'marketing.company_slots', 'INSERT', NULL, NULL, 'company_id',
     'Role slots were created for the company (one event per company per statement).'),
    (5, 'enrichment', 'contact_enriched', 'marketing.company_slots', 'UPDATE',
     $$NEW.enrichment_status = 'enriched' AND OLD.enrichment_status IS DISTINCT FROM 'enriched'$$,
     '{enrichment_status}', NULL,
     'A slot''s contact was enriched (enrichment_status became enriched).'),
    (6, 'verification', 'email_verified', 'marketing.email_verification', 'INSERT', NULL, NULL, NULL,
     'A contact email was verified (any result; valid ones make the contact outreach ready).'),
    (7, 'outreach_ready', NULL, NULL, NULL, NULL, NULL, NULL,
     'The contact''s newest email verification is valid: see marketing.vw_outreach_ready.');

-- NB: one watch per statement: CREATE TRIGGER on a table that another
-- CREATE TRIGGER of the same statement touched fails ("tuple already updated
-- by self"), so a single PERFORM over all stages would not do.
DO $$
DECLARE
    s pipeline.stages;
BEGIN
    FOR s IN SELECT * FROM pipeline.stages WHERE event_type IS NOT NULL ORDER BY stage_no LOOP
        -- NB: stage watches: their triggers run pipeline._capture_stage().
        PERFORM pipeline._watch(s.source_table, s.event_type, s.operation, s.condition, s.columns, s.group_by, true);
    END LOOP;
END
$$;

-- The stages are configuration, not secrets: whoever registers a webhook
-- or reads the funnel may look at them.
GRANT SELECT ON pipeline.stages TO PUBLIC;

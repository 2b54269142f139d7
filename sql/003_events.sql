-- 003_events.sql: the event queue and the error log.
--
-- Life of an event (marketing.pipeline_events.status):
--
--   pending --claim--> processing --delivered--> processed
--      ^                  |   |
--      |                  |   +--failed, attempts left--> failed --due again--> (claimed)
--      |                  |   +--failed, none left------> dead
--      |                  +--lease ran out (consumer crashed)--> claimed again
--      +--------------- replay (from failed, dead or processed)
--
-- next_attempt_at is when the event may be claimed: for pending and failed
-- events the earliest (next) delivery attempt, for a processing event the end
-- of its lease. One partial index on (event_type, next_attempt_at) serves
-- every claim, so the claim cost grows neither with the delivered history
-- nor with a backlog of other types.

-- NB: the checks of single columns are domains, not table CHECKs. Every event
-- is one INSERT, and PostgreSQL prepares a table's CHECK expressions again
-- for each statement (about 4 us each), while a domain's check is prepared
-- once per session: that alone made the stage triggers 40% cheaper.
-- NB: not '{0,46}' in the pattern: PostgreSQL's regular expressions expand a
-- counted repetition into states, and that form cost about 40,000
-- instructions per check against about 6,000 for this one (callgrind).
CREATE DOMAIN pipeline.event_type AS text
    CONSTRAINT event_type_format CHECK (VALUE ~ '^[a-z][a-z0-9_]*$' AND length(VALUE) <= 47);
COMMENT ON DOMAIN pipeline.event_type IS 'Lower-case identifier: a letter, then letters, digits or _, at most 47 characters.';
CREATE DOMAIN pipeline.event_status AS text
    CONSTRAINT status_known CHECK (VALUE IN ('pending', 'processing', 'processed', 'failed', 'dead'));
CREATE DOMAIN pipeline.event_source_op AS text
    CONSTRAINT source_op_known CHECK (VALUE IN ('INSERT', 'UPDATE', 'DELETE', 'EMIT'));

-- The table is partitioned by ranges of id (015_partitions.sql): each
-- partition holds the events of a day or more, and retention drops a whole
-- partition once every event in it is delivered, instead of deleting rows
-- that VACUUM then has to chase. Its indexes are the partitions' own, made
-- with each partition (pipeline._add_partitions): the id is unique because
-- one sequence numbers every event and the ranges do not overlap.
-- NB: no index or key on the partitioned table itself. A partition made at
-- run time is not a member of the extension, so pg_dump writes it as a
-- table of its own and attaches it to the table CREATE EXTENSION made; an
-- index of that table would then be built on the partition by the attach
-- and once more by the dump's own CREATE INDEX, and the restore would fail.
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

CREATE TABLE marketing.pipeline_error_log (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stage           text NOT NULL,
    -- NB: no foreign key: PostgreSQL needs a key on the partitioned events
    -- table for one. The event may be gone since (retention).
    event_id        bigint,
    error_message   text NOT NULL,
    details         jsonb NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    resolved        boolean NOT NULL DEFAULT false,
    resolved_at     timestamptz,
    resolution_note text,
    CONSTRAINT stage_not_blank CHECK (NOT pipeline._is_blank(stage)),
    CONSTRAINT error_message_not_blank CHECK (NOT pipeline._is_blank(error_message)),
    CONSTRAINT resolved_at_iff_resolved CHECK (resolved = (resolved_at IS NOT NULL))
);
CREATE INDEX pipeline_error_log_created_idx ON marketing.pipeline_error_log (created_at);
CREATE INDEX pipeline_error_log_unresolved_idx ON marketing.pipeline_error_log (created_at)
    WHERE NOT resolved;
-- An event's errors (resolved once it is delivered).
CREATE INDEX pipeline_error_log_event_idx ON marketing.pipeline_error_log (event_id);

COMMENT ON TABLE marketing.pipeline_error_log IS
    'Failures of the pipeline: failed deliveries and errors reported by receivers (pipeline.log_error).';
COMMENT ON COLUMN marketing.pipeline_error_log.stage IS 'Event type of the failed event, or the stage name a receiver reported.';
COMMENT ON COLUMN marketing.pipeline_error_log.event_id IS
    'The event the failure is about, if any; retention may have deleted it since.';
COMMENT ON COLUMN marketing.pipeline_error_log.details IS 'Structured context: attempt, status code, response excerpt, ...';

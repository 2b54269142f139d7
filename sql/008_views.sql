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

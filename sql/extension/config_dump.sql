-- config_dump.sql (extension only): make pg_dump keep the pipeline's data.
--
-- Tables created by an extension script are skipped by pg_dump unless marked
-- as configuration tables; without this a dump would hold no companies, no
-- events and no errors. The stage watches are made again by CREATE EXTENSION,
-- so only the watches users added are dumped.

SELECT pg_catalog.pg_extension_config_dump('intake.company_raw_intake', '');
SELECT pg_catalog.pg_extension_config_dump('marketing.company_master', '');
SELECT pg_catalog.pg_extension_config_dump('marketing.company_slots', '');
SELECT pg_catalog.pg_extension_config_dump('marketing.email_verification', '');
-- The events and attempts are kept in partitions (015_partitions.sql):
-- CREATE EXTENSION makes the first two, whose rows are dumped here; the
-- later ones are not members and pg_dump writes them whole.
SELECT pg_catalog.pg_extension_config_dump('marketing.pipeline_events_0', '');
SELECT pg_catalog.pg_extension_config_dump('marketing.pipeline_events_1', '');
SELECT pg_catalog.pg_extension_config_dump('marketing.pipeline_error_log', '');
SELECT pg_catalog.pg_extension_config_dump('pipeline.watches', 'WHERE NOT builtin');
SELECT pg_catalog.pg_extension_config_dump('pipeline.webhooks', '');
-- NB: not pipeline.webhook_credentials: headers and signing secrets stay out
-- of dumps; docs/security.md says how to carry them (export_registry).
SELECT pg_catalog.pg_extension_config_dump('marketing.pipeline_delivery_attempts_0', '');
SELECT pg_catalog.pg_extension_config_dump('marketing.pipeline_delivery_attempts_1', '');
-- The stage work's service settings (only what was changed: the defaults
-- are the view's), its calls, and the event types marked by hand.
SELECT pg_catalog.pg_extension_config_dump('pipeline.services', '');
SELECT pg_catalog.pg_extension_config_dump('pipeline.service_calls', '');
SELECT pg_catalog.pg_extension_config_dump('pipeline.undelivered_types', 'WHERE event_type <> ''email_verified''');

-- Identity sequences too, or restored rows would collide with new ones.
-- NB: one call per statement; each call rewrites the pg_extension row.
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('intake.company_raw_intake', 'id'), '');
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('marketing.company_master', 'id'), '');
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('marketing.company_slots', 'id'), '');
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('marketing.email_verification', 'id'), '');
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('marketing.pipeline_events', 'id'), '');
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('marketing.pipeline_error_log', 'id'), '');
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('marketing.pipeline_delivery_attempts', 'id'), '');

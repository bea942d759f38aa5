-- W3C trace context (`traceparent`), so one trace follows a group through every stage: kept with
-- the group (its first dispatch starts the trace; every later job of the group continues it),
-- with jobs that belong to no group, and with each outbox row, whose message carries it in its
-- AMQP headers. NULL when spans are not exported.
ALTER TABLE groups ADD COLUMN traceparent TEXT;
ALTER TABLE jobs ADD COLUMN traceparent TEXT;
ALTER TABLE outbox ADD COLUMN traceparent TEXT;

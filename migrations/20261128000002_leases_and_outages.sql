-- Leases follow heartbeats: a running attempt is presumed lost when nothing was heard of it for
-- `lease_secs` (it was a fixed time limit on the whole attempt).
ALTER TABLE jobs RENAME COLUMN attempt_timeout_secs TO lease_secs;

-- The service a running attempt waits for, as its worker's heartbeats say, and since when.
ALTER TABLE jobs ADD COLUMN waiting_for TEXT, ADD COLUMN waiting_since TIMESTAMPTZ;
-- The reaper's scan: running attempts by lease.
CREATE INDEX jobs_running_lease ON jobs (lease_expires_at) WHERE state = 'running';

-- Every outage the factory waited out: who waited (the coordinator, or a worker for one job), for
-- which service, how long. Written when the wait ends.
CREATE TABLE outages (
    id         BIGSERIAL PRIMARY KEY,
    service    TEXT NOT NULL CHECK (service IN ('database', 'broker', 'storage', 'llm')),
    observer   TEXT NOT NULL,
    run_id     UUID REFERENCES runs (id) ON DELETE CASCADE,
    job_id     UUID REFERENCES jobs (id) ON DELETE CASCADE,
    started_at TIMESTAMPTZ NOT NULL,
    ended_at   TIMESTAMPTZ NOT NULL
);
CREATE INDEX outages_run ON outages (run_id);

-- When the S3 objects of a failed group were removed (a failed group leaves nothing behind).
ALTER TABLE groups ADD COLUMN reclaimed_at TIMESTAMPTZ;
CREATE INDEX groups_unreclaimed_failures ON groups (run_id) WHERE decision = 'failed' AND reclaimed_at IS NULL;

-- The gauges the coordinator refreshes every few seconds read indexes only, whatever the size of
-- the jobs table: per-run job counts by kind and state (an index-only scan of the watched runs'
-- entries), and each run's latest finished job (one index probe per run).
CREATE INDEX jobs_run_kind_state ON jobs (run_id, kind, state);
CREATE INDEX jobs_run_finished ON jobs (run_id, finished_at) WHERE finished_at IS NOT NULL;

-- `syncd jobs list --run R` pages through a run's jobs in creation order, keyed by the last job
-- shown: this index serves each page without sorting the run's jobs.
CREATE INDEX jobs_run_created ON jobs (run_id, created_at, id);

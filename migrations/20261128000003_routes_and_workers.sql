-- The queue each job waits in: its kind, except generation, which is routed by the model family
-- its object needs (rigid objects: FLUX.1-Depth-dev; deformable ones: FLUX.1-dev), so that a
-- worker takes only jobs its loaded models can run.
ALTER TABLE jobs ADD COLUMN route TEXT;
UPDATE jobs SET route = CASE
    WHEN kind <> 'generate' THEN kind
    WHEN payload -> 'object' ->> 'type' = 'rigid' THEN 'generate.flux-depth-dev'
    ELSE 'generate.flux-dev'
END;
ALTER TABLE jobs ALTER COLUMN route SET NOT NULL,
    ADD CONSTRAINT jobs_route_known CHECK (route IN ('prompt', 'prior', 'generate.flux-dev',
                                                      'generate.flux-depth-dev', 'score'));
-- The dispatcher's two questions per route: how many are in flight, and which are due first.
CREATE INDEX jobs_route_in_flight ON jobs (route) WHERE state IN ('queued', 'running');
CREATE INDEX jobs_route_due ON jobs (route, created_at) WHERE state IN ('pending', 'retry_wait');

-- The latest announcement of each worker: what it runs, what it holds, when it was last heard of.
CREATE TABLE workers (
    name          TEXT PRIMARY KEY,
    host          TEXT NOT NULL,
    device        TEXT NOT NULL,
    models        JSONB NOT NULL,
    routes        JSONB NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('idle', 'busy', 'stopped')),
    current_job   UUID,
    interval_secs INTEGER NOT NULL,
    first_seen    TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_seen     TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The coordinator's whole state. Every job, decision and dead letter is a row here; RabbitMQ
-- only carries copies of jobs that the outbox relay published.

CREATE TABLE runs (
    id            UUID PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    state         TEXT NOT NULL CHECK (state IN ('active', 'paused', 'cancelled', 'completed')),
    -- The run's configuration as given (RunConfig), so a run is reproducible from its row.
    config        JSONB NOT NULL,
    seed          BIGINT NOT NULL,
    dataset_state TEXT NOT NULL DEFAULT 'pending'
                  CHECK (dataset_state IN ('pending', 'written', 'failed')),
    dataset_error TEXT,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    completed_at  TIMESTAMPTZ
);

CREATE TABLE objects (
    id           UUID PRIMARY KEY,
    run_id       UUID NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    ordinal      INTEGER NOT NULL,
    -- ObjectSpec: rigid (uid, caption, asset key) or deformable (category, description).
    spec         JSONB NOT NULL,
    state        TEXT NOT NULL
                 CHECK (state IN ('active', 'done', 'failed', 'skipped', 'cancelled')),
    -- Every prompt part is kept: the LLM's (or the input file's) backgrounds and descriptions.
    backgrounds  JSONB,
    descriptions JSONB,
    error        TEXT,
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (run_id, ordinal)
);
CREATE INDEX objects_run_state ON objects (run_id, state);

CREATE TABLE groups (
    id            UUID PRIMARY KEY,
    run_id        UUID NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    object_id     UUID NOT NULL REFERENCES objects (id) ON DELETE CASCADE,
    group_index   INTEGER NOT NULL,
    seed          BIGINT NOT NULL,
    prompts       JSONB NOT NULL,
    prior         JSONB,
    image_keys    JSONB,
    mask_keys     JSONB,
    aesthetic     JSONB,
    pairs         JSONB,
    -- L2-normalised DINOv2 embeddings of the images, for near-duplicate detection.
    embeddings    JSONB,
    decision      TEXT NOT NULL DEFAULT 'pending'
                  CHECK (decision IN ('pending', 'accepted', 'rejected', 'near_duplicate', 'failed')),
    valid_images  JSONB,
    reason        TEXT,
    decided_at    TIMESTAMPTZ,
    UNIQUE (object_id, group_index)
);
CREATE INDEX groups_run_decision ON groups (run_id, decision);

CREATE TABLE jobs (
    id               UUID PRIMARY KEY,
    run_id           UUID NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    object_id        UUID NOT NULL REFERENCES objects (id) ON DELETE CASCADE,
    group_id         UUID REFERENCES groups (id) ON DELETE CASCADE,
    kind             TEXT NOT NULL CHECK (kind IN ('prompt', 'prior', 'generate', 'score')),
    state            TEXT NOT NULL CHECK (state IN ('pending', 'queued', 'running', 'retry_wait',
                                                    'succeeded', 'failed', 'dead_lettered', 'cancelled')),
    -- JobPayload as published (without attempt and ids, which live in their own columns).
    payload          JSONB NOT NULL,
    -- The attempt the coordinator awaits; a report for another attempt is stale.
    attempts         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    -- A running attempt with no result after this long is presumed lost and retried.
    attempt_timeout_secs INTEGER NOT NULL,
    -- Earliest time of the next attempt (backoff after a transient failure).
    not_before       TIMESTAMPTZ,
    -- Set when a worker starts the attempt: started_at + attempt_timeout_secs.
    lease_expires_at TIMESTAMPTZ,
    worker           TEXT,
    last_error       TEXT,
    output           JSONB,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    started_at       TIMESTAMPTZ,
    finished_at      TIMESTAMPTZ,
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX jobs_state ON jobs (state);
CREATE INDEX jobs_run_state ON jobs (run_id, state);
CREATE INDEX jobs_object ON jobs (object_id);

-- The history of every job: one row per state change or notable report.
CREATE TABLE job_events (
    id         BIGSERIAL PRIMARY KEY,
    job_id     UUID NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    attempt    INTEGER NOT NULL,
    from_state TEXT,
    to_state   TEXT NOT NULL,
    worker     TEXT,
    detail     TEXT
);
CREATE INDEX job_events_job ON job_events (job_id, id);

-- Transactional outbox: a row is written in the same transaction as the job state change that
-- requires the message, and deleted by the relay once the broker confirmed it.
CREATE TABLE outbox (
    id         BIGSERIAL PRIMARY KEY,
    job_id     UUID NOT NULL,
    queue      TEXT NOT NULL,
    body       BYTEA NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Messages the broker dead-lettered: undecodable, or delivered too often without an ack.
CREATE TABLE dead_letters (
    id          BIGSERIAL PRIMARY KEY,
    job_id      UUID,
    queue       TEXT,
    reason      TEXT NOT NULL,
    body        BYTEA NOT NULL,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

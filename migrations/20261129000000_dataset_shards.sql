-- The dataset grows while the run runs (coordinator/src/dataset/packing.rs). Accepted groups are
-- assigned to shards as they are accepted, a full shard's worth at a time (the remainder when the
-- run finishes or is finalised), and each shard is packed once: its tar and Parquet files are
-- written, and only then is it listed in the run's index.json.
CREATE TABLE dataset_shards (
    run_id     UUID NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    shard      INTEGER NOT NULL,
    state      TEXT NOT NULL DEFAULT 'packing' CHECK (state IN ('packing', 'written')),
    -- Filled in when written: the groups whose images could not be read were failed instead.
    samples    INTEGER NOT NULL DEFAULT 0,
    images     INTEGER NOT NULL DEFAULT 0,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    written_at TIMESTAMPTZ,
    PRIMARY KEY (run_id, shard)
);
CREATE INDEX dataset_shards_packing ON dataset_shards (created_at) WHERE state = 'packing';

-- The shard that packs an accepted group; NULL until the group is assigned one.
ALTER TABLE groups ADD COLUMN shard INTEGER;
CREATE INDEX groups_unassigned ON groups (run_id) WHERE decision = 'accepted' AND shard IS NULL;
CREATE INDEX groups_shard ON groups (run_id, shard) WHERE shard IS NOT NULL;

-- Set by `syncd run finalize` on a paused or cancelled run: its accepted groups are packed and
-- its index marked complete without waiting for the rest of its objects.
ALTER TABLE runs ADD COLUMN finalize_requested_at TIMESTAMPTZ;

-- Runs completed before shards were recorded keep the dataset their assembly wrote: their
-- accepted groups count as packed (shard -1, never a real shard number), so nothing is packed
-- again.
UPDATE groups g SET shard = -1
FROM runs r
WHERE r.id = g.run_id AND r.dataset_state = 'written' AND g.decision = 'accepted';

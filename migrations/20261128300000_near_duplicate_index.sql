-- The near-duplicate index (coordinator/src/near_duplicates.rs): one row per image of every
-- accepted group, with the image's DINOv2 embedding and its locality-sensitive signature (one
-- bucket key per band, salted by the run). A check looks up the groups sharing a bucket with the
-- candidate through the GIN index and applies the exact rule to them, so its cost follows the
-- number of similar groups, not the size of the run, and a restart loads nothing.
CREATE TABLE near_duplicate_images (
    group_id  UUID NOT NULL REFERENCES groups (id) ON DELETE CASCADE,
    image     SMALLINT NOT NULL,
    run_id    UUID NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    buckets   BIGINT[] NOT NULL,
    embedding REAL[] NOT NULL,
    PRIMARY KEY (group_id, image)
);
CREATE INDEX near_duplicate_images_buckets ON near_duplicate_images USING gin (buckets);
CREATE INDEX near_duplicate_images_run ON near_duplicate_images (run_id);

-- Runs with groups accepted before the index existed: their accepted groups are indexed (from
-- groups.embeddings) by the first check that meets the run, and the row is then deleted.
CREATE TABLE near_duplicate_backfills (
    run_id UUID PRIMARY KEY REFERENCES runs (id) ON DELETE CASCADE
);
INSERT INTO near_duplicate_backfills (run_id)
SELECT DISTINCT run_id FROM groups WHERE decision = 'accepted';

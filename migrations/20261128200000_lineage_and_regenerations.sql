-- A group's lineage, for its dataset record: the settings of its generation job (GenerationSettings,
-- kept when the group is planned), and what generated and scored the images it holds (Provenance:
-- worker, device, precision, code version, models with their weights' hashes), kept with the
-- images and the scores. NULL for groups made before workers reported it.
ALTER TABLE groups
    ADD COLUMN generation   JSONB,
    ADD COLUMN generated_by JSONB,
    ADD COLUMN scored_by    JSONB;

-- `syncd group regenerate`: a group generated again from its lineage, into a prefix of its own
-- (runs/{run}/groups/{group}/regenerations/{number}/), by a generation job that changes nothing
-- about the group. `image_keys`/`mask_keys`/`generated_by` are the job's outputs, recorded like a
-- group's (only the awaited attempt's); `comparison` is what `syncd group regenerate` found when
-- it compared them with the group's images.
CREATE TABLE regenerations (
    group_id     UUID NOT NULL REFERENCES groups (id) ON DELETE CASCADE,
    number       INTEGER NOT NULL,
    job_id       UUID NOT NULL UNIQUE REFERENCES jobs (id) ON DELETE CASCADE,
    requested_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    image_keys   JSONB,
    mask_keys    JSONB,
    generated_by JSONB,
    generated_at TIMESTAMPTZ,
    comparison   JSONB,
    compared_at  TIMESTAMPTZ,
    PRIMARY KEY (group_id, number)
);

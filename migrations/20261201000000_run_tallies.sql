-- Per-run counts of jobs by kind and state and of groups by decision, kept up to date as the rows
-- change, so that the gauges read a few rows per run instead of counting every job and group of
-- the watched runs every 5 s (at 500K objects, a million index entries per refresh).
--
-- The jobs' and groups' triggers append every change of a run's counts to `run_tally_changes`,
-- whatever statement made it: no writer can forget to count.
-- Appending takes no lock that another writer waits for. The coordinator's gauge loop folds the
-- changes into `run_tallies` (`db/run_tallies.rs`): it deletes the committed changes and adds
-- them up in one statement, so every change is counted exactly once, by whichever coordinator
-- folds first.

CREATE TABLE run_tally_changes (
    run_id  UUID NOT NULL,
    -- The jobs of one kind (the kind's name), or the groups ('groups').
    subject TEXT NOT NULL,
    -- A job state, or a group decision.
    state   TEXT NOT NULL,
    delta   BIGINT NOT NULL
);

CREATE TABLE run_tallies (
    run_id  UUID NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    subject TEXT NOT NULL,
    state   TEXT NOT NULL,
    count   BIGINT NOT NULL,
    PRIMARY KEY (run_id, subject, state)
);

-- One function per table for its three triggers. Inserts and deletes are counted per statement
-- (a run's creation inserts its jobs in a few statements of thousands of rows); an update only
-- when it changes the counted column, row by row, so the many updates that do not (a job's
-- lease, a group's images) cost the trigger nothing.
CREATE FUNCTION tally_job_changes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        INSERT INTO run_tally_changes (run_id, subject, state, delta)
        VALUES (NEW.run_id, NEW.kind, NEW.state, 1), (OLD.run_id, OLD.kind, OLD.state, -1);
    ELSIF TG_OP = 'INSERT' THEN
        INSERT INTO run_tally_changes (run_id, subject, state, delta)
        SELECT run_id, kind, state, count(*) FROM new_rows GROUP BY run_id, kind, state;
    ELSE
        INSERT INTO run_tally_changes (run_id, subject, state, delta)
        SELECT run_id, kind, state, -count(*) FROM old_rows GROUP BY run_id, kind, state;
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION tally_group_changes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        INSERT INTO run_tally_changes (run_id, subject, state, delta)
        VALUES (NEW.run_id, 'groups', NEW.decision, 1), (OLD.run_id, 'groups', OLD.decision, -1);
    ELSIF TG_OP = 'INSERT' THEN
        INSERT INTO run_tally_changes (run_id, subject, state, delta)
        SELECT run_id, 'groups', decision, count(*) FROM new_rows GROUP BY run_id, decision;
    ELSE
        INSERT INTO run_tally_changes (run_id, subject, state, delta)
        SELECT run_id, 'groups', decision, -count(*) FROM old_rows GROUP BY run_id, decision;
    END IF;
    RETURN NULL;
END
$$;

-- The same three triggers on both tables: (table, counted column, function). Creating them locks
-- both tables against writes until this migration commits, so the counts below see every row
-- written before, and the triggers every change after.
DO $$
DECLARE
    counted RECORD;
BEGIN
    FOR counted IN SELECT * FROM (VALUES ('jobs', 'state', 'tally_job_changes'),
                                         ('groups', 'decision', 'tally_group_changes'))
                                 AS t (tbl, col, fn) LOOP
        EXECUTE format('CREATE TRIGGER %1$s_tally_insert AFTER INSERT ON %1$I
                            REFERENCING NEW TABLE AS new_rows
                            FOR EACH STATEMENT EXECUTE FUNCTION %3$I()',
                       counted.tbl, counted.col, counted.fn);
        EXECUTE format('CREATE TRIGGER %1$s_tally_update AFTER UPDATE OF %2$I ON %1$I
                            FOR EACH ROW WHEN (OLD.%2$I IS DISTINCT FROM NEW.%2$I)
                            EXECUTE FUNCTION %3$I()',
                       counted.tbl, counted.col, counted.fn);
        EXECUTE format('CREATE TRIGGER %1$s_tally_delete AFTER DELETE ON %1$I
                            REFERENCING OLD TABLE AS old_rows
                            FOR EACH STATEMENT EXECUTE FUNCTION %3$I()',
                       counted.tbl, counted.col, counted.fn);
    END LOOP;
END
$$;

INSERT INTO run_tallies (run_id, subject, state, count)
SELECT run_id, kind, state, count(*) FROM jobs GROUP BY run_id, kind, state;
INSERT INTO run_tallies (run_id, subject, state, count)
SELECT run_id, 'groups', decision, count(*) FROM groups GROUP BY run_id, decision;

-- The jobs' tallies count by route (the queue a job waits in: its kind, or for a generation its
-- model family) instead of by kind, so that the dispatcher reads how many jobs each route has in
-- flight from the tallies: a few rows whatever the size of the run. It counted them in the jobs
-- table, through an index whose entries for the rows' dead versions a busy run adds faster than
-- vacuum removes them: mid-run at 10K objects one count read 29K index entries and 3,800 heap
-- pages for the 1,000 jobs in flight, twice a second, and more the longer the run. A kind's
-- tallies are the sum of its routes'; the groups' are unchanged.
--
-- The jobs table is locked against writes until this migration commits, so the counts below see
-- every row written before, and the new trigger function every change after. Changes not yet
-- folded are counted by kind: they are dropped with the jobs' tallies, which are counted anew.
LOCK TABLE jobs IN SHARE ROW EXCLUSIVE MODE;

CREATE OR REPLACE FUNCTION tally_job_changes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        INSERT INTO run_tally_changes (run_id, subject, state, delta)
        VALUES (NEW.run_id, NEW.route, NEW.state, 1), (OLD.run_id, OLD.route, OLD.state, -1);
    ELSIF TG_OP = 'INSERT' THEN
        INSERT INTO run_tally_changes (run_id, subject, state, delta)
        SELECT run_id, route, state, count(*) FROM new_rows GROUP BY run_id, route, state;
    ELSE
        INSERT INTO run_tally_changes (run_id, subject, state, delta)
        SELECT run_id, route, state, -count(*) FROM old_rows GROUP BY run_id, route, state;
    END IF;
    RETURN NULL;
END
$$;

-- A job's route is fixed when it is inserted; should an update ever change it, it is counted too.
DROP TRIGGER jobs_tally_update ON jobs;
CREATE TRIGGER jobs_tally_update AFTER UPDATE OF state, route ON jobs
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state OR OLD.route IS DISTINCT FROM NEW.route)
    EXECUTE FUNCTION tally_job_changes();

DELETE FROM run_tally_changes WHERE subject <> 'groups';
DELETE FROM run_tallies WHERE subject <> 'groups';
INSERT INTO run_tallies (run_id, subject, state, count)
SELECT run_id, route, state, count(*) FROM jobs GROUP BY run_id, route, state;

-- The in-flight index served only the dispatcher's count: it cost each job two entries.
DROP INDEX jobs_route_in_flight;

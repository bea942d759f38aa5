-- Whether each worker is alive: not stopped, and heard of within three of its announcement
-- intervals (after three missed announcements a worker that never said goodbye is presumed
-- gone). One definition for the gauges, `syncd workers` and `syncd run status`.
CREATE VIEW worker_liveness AS
SELECT w.name, w.state, w.current_job, w.last_seen,
       (w.state <> 'stopped'
        AND w.last_seen > now() - make_interval(secs => w.interval_secs * 3)) AS alive
FROM workers w;

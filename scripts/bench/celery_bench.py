"""Celery beside syncd's scale benchmark (scripts/bench/scale.sh), on the same RabbitMQ and
PostgreSQL, with the reliability settings syncd uses: persistent messages, publisher confirms,
late acks, one message per worker process at a time, results stored in PostgreSQL.

Two kinds of work:
  noop  -- returns its argument: the task queue alone;
  s3    -- puts three small objects in the S3 store and reads them back, as many S3 calls per
           task as a syncd job makes (a generation writes six, a scoring reads six).

Usage: celery_bench.py --tasks N --workers W --work noop|s3 [--json]
Reads SYNCD_TEST_AMQP_URL, SYNCD_TEST_DATABASE_URL and SYNCD_TEST_S3_* (scripts/setup.sh writes
them to ~/.cache/syncd/services.env). Prints tasks per second from the first send to the last
stored result, the CPU-seconds the Celery processes used, and the CPU each service (RabbitMQ,
PostgreSQL) used meanwhile, per task, as syncd-bench-scale does for syncd's jobs.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import uuid

import psycopg2
from celery import Celery

BENCH_ID = os.environ.get("CELERY_BENCH_ID") or uuid.uuid4().hex[:10]
ADMIN_URL = os.environ.get("SYNCD_TEST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
DATABASE = f"celery_bench_{BENCH_ID}"
BACKEND_URL = "db+" + ADMIN_URL.replace("postgres://", "postgresql+psycopg2://").rsplit("/", 1)[0] + "/" + DATABASE
BROKER_URL = os.environ.get("SYNCD_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
QUEUE = f"celery-bench-{BENCH_ID}"

app = Celery("syncd_celery_bench", broker=BROKER_URL, backend=BACKEND_URL)
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    broker_transport_options={"confirm_publish": True},
    task_default_delivery_mode="persistent",
    task_default_queue=QUEUE,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_hijack_root_logger=False,
)

_s3 = None


def s3_client():
    global _s3
    if _s3 is None:
        import boto3

        _s3 = boto3.client(
            "s3",
            endpoint_url=os.environ["SYNCD_TEST_S3_ENDPOINT"],
            region_name=os.environ.get("SYNCD_TEST_S3_REGION", "garage"),
            aws_access_key_id=os.environ["SYNCD_TEST_S3_ACCESS_KEY_ID"],
            aws_secret_access_key=os.environ["SYNCD_TEST_S3_SECRET_ACCESS_KEY"],
        )
    return _s3


# Named explicitly: the driver runs this file as __main__, the worker imports it as a module.
@app.task(name="syncd_bench.noop")
def noop(index):
    return index


@app.task(name="syncd_bench.s3_work")
def s3_work(index):
    client = s3_client()
    bucket = os.environ.get("SYNCD_TEST_S3_BUCKET", "syncd")
    body = os.urandom(2048)
    keys = [f"celery-bench/{BENCH_ID}/{index}/{image}.png" for image in range(3)]
    for key in keys:
        client.put_object(Bucket=bucket, Key=key, Body=body, ContentType="image/png")
    for key in keys:
        client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return index


def admin_connection():
    connection = psycopg2.connect(ADMIN_URL)
    connection.autocommit = True
    return connection


def process_stat(pid):
    """(program, parent pid, CPU-seconds used) of a live process from /proc/PID/stat; None once
    it has exited."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            text = stat.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    program = text[text.find("(") + 1:text.rfind(")")]
    fields = text.rsplit(")", 1)[1].split()
    seconds = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return program, int(fields[1]), seconds


def live_processes():
    """(pid, (program, parent pid, CPU-seconds)) of every live process."""
    pids = (int(entry) for entry in os.listdir("/proc") if entry.isdigit())
    return [(pid, stat) for pid in pids if (stat := process_stat(pid))]


def cpu_seconds(pids):
    return sum(stat[2] for stat in map(process_stat, pids) if stat)


def cpu_seconds_by_program():
    """CPU-seconds used so far by the live processes of each program (`comm`): RabbitMQ is
    `beam.smp`, PostgreSQL's backends `postgres`. Processes that exited meanwhile are not
    counted (syncd-bench-scale counts the same way)."""
    totals = {}
    for _, (program, _, seconds) in live_processes():
        totals[program] = totals.get(program, 0.0) + seconds
    return totals


def process_tree(root):
    """The root and its children: the prefork pool's processes."""
    return {root} | {pid for pid, (_, parent, _) in live_processes() if parent == root}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, required=True)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--work", choices=["noop", "s3"], default="noop")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    admin = admin_connection()
    admin.cursor().execute(f"CREATE DATABASE {DATABASE}")
    environment = dict(os.environ, CELERY_BENCH_ID=BENCH_ID)
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "celery_bench", "worker", "--pool", "prefork",
         "--concurrency", str(args.workers), "--loglevel", "WARNING", "-Q", QUEUE],
        cwd=os.path.dirname(os.path.abspath(__file__)),
        env=environment,
    )
    try:
        results = psycopg2.connect(ADMIN_URL.rsplit("/", 1)[0] + "/" + DATABASE)
        results.autocommit = True
        # The worker creates the result table on its first task: warm up with one.
        noop.delay(-1).get(timeout=120)
        time.sleep(1)
        pids = process_tree(worker.pid)
        cpu_before = cpu_seconds(pids)
        services_before = cpu_seconds_by_program()
        task = noop if args.work == "noop" else s3_work
        started = time.monotonic()
        for index in range(args.tasks):
            task.delay(index)
        sent = time.monotonic() - started
        cursor = results.cursor()
        while True:
            cursor.execute("SELECT count(*) FROM celery_taskmeta WHERE status = 'SUCCESS'")
            done = cursor.fetchone()[0] - 1
            if done >= args.tasks:
                break
            if time.monotonic() - started > 60 + args.tasks:
                raise SystemExit(f"only {done} of {args.tasks} tasks finished")
            time.sleep(0.1)
        elapsed = time.monotonic() - started
        pids = process_tree(worker.pid)
        worker_cpu = cpu_seconds(pids) - cpu_before
        services_after = cpu_seconds_by_program()
        service_ms_per_task = {
            service: 1000.0 * (services_after.get(program, 0.0) - services_before.get(program, 0.0)) / args.tasks
            for service, program in (("rabbitmq", "beam.smp"), ("postgresql", "postgres"))
        }
        driver_cpu = resource.getrusage(resource.RUSAGE_SELF)
        figures = {
            "work": args.work,
            "tasks": args.tasks,
            "workers": args.workers,
            "tasks_per_second": args.tasks / elapsed,
            "send_seconds": sent,
            "seconds": elapsed,
            "celery_worker_cpu_ms_per_task": 1000.0 * worker_cpu / args.tasks,
            "client_cpu_ms_per_task": 1000.0 * (driver_cpu.ru_utime + driver_cpu.ru_stime) / args.tasks,
            "service_cpu_ms_per_task": service_ms_per_task,
        }
        print(f"celery {args.work}: {args.tasks} tasks, {args.workers} worker processes: "
              f"{figures['tasks_per_second']:.0f} tasks/s ({elapsed:.1f} s), "
              f"{figures['celery_worker_cpu_ms_per_task']:.2f} ms worker CPU per task")
        print(f"CPU per task: client {figures['client_cpu_ms_per_task']:.2f} ms, " + ", ".join(
            f"{service} {ms:.2f} ms" for service, ms in service_ms_per_task.items()))
        if args.json:
            print(json.dumps(figures))
        results.close()
    finally:
        worker.terminate()
        worker.wait(timeout=60)
        admin.cursor().execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
        # The run's queue is durable: left behind, every run would add one to the broker.
        with app.connection_for_write() as connection:
            connection.default_channel.queue_delete(QUEUE)


if __name__ == "__main__":
    main()

//! Fuzzes the wire decoders: any bytes on a job queue or the results queue must decode to a
//! message or give a `DecodeError` (and so be dead-lettered), never a panic. A message that
//! decodes must encode and decode to itself, so what the coordinator stores is what was sent.

#![no_main]

use libfuzzer_sys::fuzz_target;
use syncd_proto::messages::{JobMessage, WorkerReport};

fuzz_target!(|data: &[u8]| {
    if let Ok(job) = JobMessage::decode(data) {
        let again = JobMessage::decode(&job.encode()).expect("an encoded job decodes");
        assert_eq!(again.job_id, job.job_id);
    }
    if let Ok(report) = WorkerReport::decode(data) {
        let again = WorkerReport::decode(&report.encode()).expect("an encoded report decodes");
        assert_eq!(again.job_id, report.job_id);
    }
});

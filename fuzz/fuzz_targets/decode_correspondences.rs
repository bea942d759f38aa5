//! Fuzzes the correspondence file decoder (`correspondences.bin`, written by the prior and read
//! by generation): any bytes must give a set or a `CorrespondenceDecodeError`, never a panic or
//! an allocation beyond what the input holds. A set that decodes must encode to bytes that
//! decode to the same set.

#![no_main]

use libfuzzer_sys::fuzz_target;
use syncd_proto::correspondence::CorrespondenceSet;

fuzz_target!(|data: &[u8]| {
    if let Ok(set) = CorrespondenceSet::decode(data) {
        let again = CorrespondenceSet::decode(&set.encode()).expect("an encoded set decodes");
        assert_eq!(again.encode(), set.encode());
    }
});

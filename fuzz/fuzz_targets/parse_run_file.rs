//! Fuzzes run files, the coordinator's other outside input: any bytes must give a run
//! configuration or an error that says what is wrong, never a panic (an overflow in a check, an
//! unchecked index). A file that parses also goes through the planner's count of what it would
//! create (with no objects: inputs are files, not fuzzed here), which multiplies its settings.

#![no_main]

use libfuzzer_sys::fuzz_target;
use syncd_coordinator::input::RunInputs;
use syncd_coordinator::plan::plan_run;
use syncd_coordinator::run_config::RunConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = RunConfig::from_toml(text) {
        let _ = plan_run(&config, &RunInputs::default(), None);
        let _ = serde_json::to_string(&config);
    }
});

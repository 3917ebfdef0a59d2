//! A recording (`vmtrace replay`, `report`, `top --replay`) of any bytes is read without panicking:
//! each line is a sample or a one-line error, and every sample read writes back to JSON that reads
//! back the same, as recordings replay exactly.

#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use vmtrace::{input::RecordingReader, sample::sampler::Sample};

fuzz_target!(|data: &[u8]| {
    let mut reader = match RecordingReader::new(Box::new(Cursor::new(data.to_vec())), "fuzz.jsonl")
    {
        Ok(reader) => reader,
        Err(e) => return one_line(&e.to_string()),
    };
    if let Some(header) = reader.header() {
        let json = serde_json::to_string(header).expect("a header serializes");
        assert!(!json.contains('\n'));
    }
    for sample in reader.by_ref() {
        match sample {
            Ok(sample) => {
                let json = serde_json::to_string(&sample).expect("a sample serializes");
                assert!(!json.contains('\n'), "a sample must be one line: {json}");
                let back: Sample = serde_json::from_str(&json)
                    .unwrap_or_else(|e| panic!("{json} does not read back: {e}"));
                assert_eq!(back, sample, "{json}");
                assert_eq!(serde_json::to_string(&back).unwrap(), json);
            }
            Err(e) => return one_line(&e.to_string()),
        }
    }
});

fn one_line(error: &str) {
    assert!(!error.contains('\n'), "not one line: {error:?}");
}

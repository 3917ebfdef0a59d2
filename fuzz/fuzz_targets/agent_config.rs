//! `vmtrace agent --config FILE`: any file content either resolves to settings within their ranges
//! or is refused with one line, never a panic.

#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    match vmtrace::input::agent_config(text) {
        Ok(config) => {
            assert!(config.interval >= Duration::from_millis(10), "{config:?}");
            assert!(config.window >= config.interval, "{config:?}");
            if let Some(otlp) = &config.otlp {
                assert!(otlp.interval >= Duration::from_millis(100), "{config:?}");
                assert!(otlp.timeout >= Duration::from_millis(10), "{config:?}");
            }
        }
        Err(error) => {
            assert!(!error.contains('\n'), "not one line: {error:?}");
            assert!(!error.is_empty());
        }
    }
});

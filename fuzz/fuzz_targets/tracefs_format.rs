//! A tracefs event `format` file, whatever it holds, parses without panicking: its fields, and the
//! exit-reason tables of its `print fmt:` line (read from kvm_exit's format file at load time).

#![no_main]

use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;
use vmtrace::input::{EventFormat, ExitReasonNames};

fuzz_target!(|text: &str| {
    let format = EventFormat::parse(PathBuf::from("events/kvm/kvm_exit/format"), text);
    for field in &format.fields {
        // The first field of a name is the one looked up; at its own width it is found.
        let first = format.fields.iter().find(|f| f.name == field.name).unwrap();
        assert_eq!(
            format.offset_of(&field.name, first.size).ok(),
            Some(first.offset)
        );
        let wrong = format.offset_of(&field.name, first.size.wrapping_add(1));
        assert!(!wrong.unwrap_err().to_string().contains('\n'));
    }
    // The agent hands the kernel's `print fmt:` line over, and tests hand the whole file.
    for names in [
        ExitReasonNames::from_print_fmt(&format.print_fmt),
        ExitReasonNames::from_print_fmt(text),
    ] {
        for isa in 0..=4 {
            for reason in [0, 1, 30, 0x7b, 0xffff, 0x1_0000, 0x8000_0021, u32::MAX] {
                names.name(isa, reason);
            }
            names.source(isa);
        }
    }
});

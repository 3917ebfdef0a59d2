//! tracefs: where it is, mounting it when absent, and reading event format files.
//!
//! Classic tracepoints are attached by the event id that tracefs publishes, and their records are read
//! at the offsets its format files give; raw tracepoints need neither.

use std::{
    ffi::CString,
    fs,
    path::{Path, PathBuf},
};

use thiserror::Error;
use vmtrace_common::mounts::MountTable;

/// Where tracefs is mounted by default on current kernels.
pub const DEFAULT_MOUNT: &str = "/sys/kernel/tracing";

#[derive(Debug, Error)]
pub enum TracefsError {
    #[error(
        "tracefs is not mounted and mounting it at {DEFAULT_MOUNT} failed: {0} (mount it with `mount -t tracefs nodev {DEFAULT_MOUNT}`)"
    )]
    MountFailed(std::io::Error),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: field `{field}` not found")]
    MissingField { path: PathBuf, field: String },
    #[error("{path}: field `{field}` is {actual} bytes wide, expected {expected}")]
    FieldSize {
        path: PathBuf,
        field: String,
        actual: u32,
        expected: u32,
    },
}

/// Finds the tracefs mount point from the mount table (tracefs itself, or debugfs' tracing dir),
/// wherever it is mounted: the loader attaches classic tracepoints through the place found here
/// (`probe::load`), so a tracefs mounted only in a chroot's or a container's tree serves as well as
/// one at [`DEFAULT_MOUNT`].
pub fn find() -> Option<PathBuf> {
    let table = MountTable::read().ok()?;
    if let Some(tracefs) = table.tracefs() {
        return Some(tracefs.mount_point.clone());
    }
    let debugfs = table.debugfs()?.mount_point.join("tracing");
    debugfs.join("events").is_dir().then_some(debugfs)
}

/// Where tracefs is, and whether vmtrace mounted it there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub path: PathBuf,
    /// True when no tracefs was mounted and vmtrace mounted it at [`DEFAULT_MOUNT`].
    pub mounted_here: bool,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let how = if self.mounted_here {
            "mounted there by vmtrace: it was not mounted"
        } else {
            "from the mount table"
        };
        write!(f, "{} ({how})", self.path.display())
    }
}

/// Returns the tracefs mount point, mounting tracefs at its default place if it is not mounted.
pub fn find_or_mount() -> Result<Location, TracefsError> {
    if let Some(path) = find() {
        return Ok(Location {
            path,
            mounted_here: false,
        });
    }
    let source = CString::new("nodev").expect("no NUL");
    let target = CString::new(DEFAULT_MOUNT).expect("no NUL");
    let fstype = CString::new("tracefs").expect("no NUL");
    // SAFETY: all pointers are valid NUL-terminated strings; data may be NULL for tracefs.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(TracefsError::MountFailed(std::io::Error::last_os_error()));
    }
    Ok(Location {
        path: PathBuf::from(DEFAULT_MOUNT),
        mounted_here: true,
    })
}

/// The id tracefs gives a classic tracepoint (`events/<category>/<event>/id`), by which
/// `perf_event_open` opens it.
pub fn event_id(tracefs: &Path, category: &str, event: &str) -> Result<u64, TracefsError> {
    let path = tracefs.join("events").join(category).join(event).join("id");
    let text = fs::read_to_string(&path).map_err(|source| TracefsError::Read {
        path: path.clone(),
        source,
    })?;
    text.trim().parse().map_err(|e| TracefsError::Read {
        path,
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })
}

/// One field of a trace event record, as the format file describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub offset: u32,
    pub size: u32,
}

/// An event's format file, parsed.
#[derive(Debug, Clone)]
pub struct EventFormat {
    pub path: PathBuf,
    pub fields: Vec<Field>,
    /// The `print fmt:` line, which holds the event's symbolic tables.
    pub print_fmt: String,
}

impl EventFormat {
    pub fn read(tracefs: &Path, category: &str, event: &str) -> Result<Self, TracefsError> {
        let path = tracefs
            .join("events")
            .join(category)
            .join(event)
            .join("format");
        let text = fs::read_to_string(&path).map_err(|source| TracefsError::Read {
            path: path.clone(),
            source,
        })?;
        Ok(Self::parse(path, &text))
    }

    pub fn parse(path: PathBuf, text: &str) -> Self {
        let fields = text.lines().filter_map(parse_field).collect();
        let print_fmt = text
            .lines()
            .find_map(|l| l.strip_prefix("print fmt: "))
            .unwrap_or_default()
            .to_owned();
        Self {
            path,
            fields,
            print_fmt,
        }
    }

    /// The offset of `name`, checked to be `size` bytes wide.
    pub fn offset_of(&self, name: &str, size: u32) -> Result<u32, TracefsError> {
        let field = self.fields.iter().find(|f| f.name == name).ok_or_else(|| {
            TracefsError::MissingField {
                path: self.path.clone(),
                field: name.to_owned(),
            }
        })?;
        if field.size != size {
            return Err(TracefsError::FieldSize {
                path: self.path.clone(),
                field: name.to_owned(),
                actual: field.size,
                expected: size,
            });
        }
        Ok(field.offset)
    }
}

/// Parses `\tfield:unsigned int exit_reason;\toffset:8;\tsize:4;\tsigned:0;`.
fn parse_field(line: &str) -> Option<Field> {
    let mut parts = line.trim().split(';').map(str::trim);
    let declaration = parts.next()?.strip_prefix("field:")?;
    let name = declaration.rsplit(' ').next()?;
    // Arrays are declared as `char comm[16]`: the name is what precedes the bracket.
    let name = name.split('[').next()?.to_owned();
    let mut offset = None;
    let mut size = None;
    for part in parts {
        if let Some(v) = part.strip_prefix("offset:") {
            offset = v.parse().ok();
        } else if let Some(v) = part.strip_prefix("size:") {
            size = v.parse().ok();
        }
    }
    Some(Field {
        name,
        offset: offset?,
        size: size?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KVM_EXIT: &str = "name: kvm_exit\nID: 103\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\n\
\tfield:unsigned int exit_reason;\toffset:8;\tsize:4;\tsigned:0;\n\
\tfield:unsigned long guest_rip;\toffset:16;\tsize:8;\tsigned:0;\n\
\tfield:char comm[16];\toffset:24;\tsize:16;\tsigned:0;\n\n\
print fmt: \"vcpu %u reason %s\", REC->vcpu_id\n";

    #[test]
    fn parses_fields_and_print_fmt() {
        let format = EventFormat::parse(PathBuf::from("kvm_exit/format"), KVM_EXIT);
        assert_eq!(format.offset_of("exit_reason", 4).unwrap(), 8);
        assert_eq!(format.offset_of("guest_rip", 8).unwrap(), 16);
        assert_eq!(format.offset_of("comm", 16).unwrap(), 24);
        assert!(format.print_fmt.starts_with("\"vcpu %u"));
    }

    #[test]
    fn a_wrong_width_or_missing_field_is_an_error() {
        let format = EventFormat::parse(PathBuf::from("kvm_exit/format"), KVM_EXIT);
        let err = format.offset_of("exit_reason", 8).unwrap_err().to_string();
        assert!(err.contains("4 bytes wide, expected 8"), "{err}");
        assert!(matches!(
            format.offset_of("isa", 4),
            Err(TracefsError::MissingField { .. })
        ));
    }
}

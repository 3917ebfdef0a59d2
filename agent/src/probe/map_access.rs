//! What reading and deleting map entries can go wrong with, shared by every reader of the maps.

use aya::{maps::MapError, sys::SyscallError};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum CountsError {
    #[error("the eBPF object has no map `{0}`")]
    MissingMap(&'static str),
    // The map's error is the source, so that a report of the chain ends with the errno.
    #[error("reading map `{0}`")]
    Map(&'static str, #[source] MapError),
}

/// The result of a delete, with "no such entry" (`ENOENT` from `bpf_map_delete_elem`) as success.
pub fn absent_is_removed(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(SyscallError { io_error, .. }))
            if io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn syscall_error(errno: i32) -> MapError {
        MapError::SyscallError(SyscallError {
            call: "bpf_map_delete_elem",
            io_error: std::io::Error::from_raw_os_error(errno),
        })
    }

    #[test]
    fn an_entry_the_kernel_deleted_first_counts_as_removed() {
        assert!(absent_is_removed(Err(syscall_error(libc::ENOENT))).is_ok());
        assert!(absent_is_removed(Err(MapError::KeyNotFound)).is_ok());
        assert!(absent_is_removed(Ok(())).is_ok());
        // Any other failure is one: a bad descriptor or a refused call says the map is not usable.
        for errno in [libc::EBADF, libc::EPERM, libc::EINVAL] {
            assert!(matches!(
                absent_is_removed(Err(syscall_error(errno))),
                Err(MapError::SyscallError(_))
            ));
        }
        // A message that merely reads like ENOENT is not taken for it.
        assert!(
            absent_is_removed(Err(MapError::SyscallError(SyscallError {
                call: "bpf_map_delete_elem",
                io_error: std::io::Error::other("No such file or directory"),
            })))
            .is_err()
        );
    }
}

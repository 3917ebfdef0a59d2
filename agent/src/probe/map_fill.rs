//! How full the kernel's hash maps are: their entries against their capacity, for the agent's
//! own health metrics. A full map drops what it cannot take (a counted `Drop` reason); its fill
//! gauge says how close each map is to that.

use aya::maps::{MapData, MapError};

/// One map's entries and capacity (`max_entries`) at one sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapFill {
    /// The map's name in the eBPF object (`EXIT_COUNTS`, `DOORBELLS`, ...).
    pub map: &'static str,
    pub entries: u32,
    pub capacity: u32,
}

/// The fill of the map `data`, named `name`, which holds `entries` (as the tick's batch read of it
/// found them) and `max_entries` as the kernel reports it, so that a capacity set at load time is
/// the one shown.
pub fn of(name: &'static str, data: &MapData, entries: usize) -> MapFill {
    let capacity = data.info().map_or(0, |info| info.max_entries());
    MapFill {
        map: name,
        entries: u32::try_from(entries).unwrap_or(u32::MAX),
        capacity,
    }
}

/// The fill of a map the tick does not read whole, whose keys are `keys`: counted one
/// `bpf_map_get_next_key` each, no value read. Only for small maps (doorbells, VMM processes).
pub fn of_keys<K>(
    name: &'static str,
    data: &MapData,
    keys: impl Iterator<Item = Result<K, MapError>>,
) -> MapFill {
    // The iteration ends early only if the kernel refuses a step; what was counted until then is
    // the best figure there is.
    of(name, data, keys.map_while(Result::ok).count())
}

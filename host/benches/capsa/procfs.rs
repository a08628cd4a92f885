//! What `/proc` says of this process and its machine: context switches,
//! resident memory, page tables, mappings, the CPU's name.

/// One mapping of this process: start address, size, resident bytes, name.
pub type Mapping = (u64, u64, u64, String);

/// The CPU's model name, empty where `/proc/cpuinfo` does not say.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default()
}

/// Context switches of this whole process so far, read from
/// `/proc/self/task/*/status` (voluntary and not). A thread that has
/// ended counts no more.
pub fn context_switches() -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        for line in status.lines() {
            if let Some(v) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                total += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    total
}

/// Bytes of page tables this process holds (`VmPTE`): what the host pays
/// for mapping guests' memory reservations, beyond their resident pages.
pub fn page_table_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmPTE:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// This process's mappings, in address order.
pub fn mappings() -> Vec<Mapping> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let mut out: Vec<Mapping> = Vec::new();
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        if let Some((start, end)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
            {
                let name = words.nth(4).unwrap_or("[anon]").to_string();
                out.push((start, end - start, 0, name));
                continue;
            }
        }
        if first == "Rss:" {
            if let (Some(kib), Some(last)) = (words.next(), out.last_mut()) {
                last.2 = kib.parse::<u64>().unwrap_or(0) * 1024;
            }
        }
    }
    out
}

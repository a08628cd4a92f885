//! CPU budgets (`Options.cpuBudgetMillis`) for ELF processes.
//!
//! A budget covers the whole process group the agent started: the leader,
//! whatever it forked that still runs, and what it has already waited for.
//! The agent adds those up from `/proc` every [`POLL`] and kills the group
//! when the sum passes the budget, so the status a WASM guest gets for the
//! same thing (`cpuBudgetExceeded`) comes within about one poll of it (the
//! kernel counts in clock ticks, 10 ms). Each process also gets an
//! `RLIMIT_CPU` of the budget rounded up to whole seconds, a backstop the
//! kernel enforces with SIGXCPU should the agent itself fall behind.

use std::fs;
use std::io;
use std::time::Duration;

use nix::unistd::Pid;

/// How often a budgeted group's CPU time is added up.
pub const POLL: Duration = Duration::from_millis(10);

/// The `RLIMIT_CPU` backstop for `budget`: whole seconds, at least one.
pub fn rlimit_seconds(budget: Duration) -> u64 {
    budget.as_secs() + u64::from(budget.subsec_nanos() > 0).max(u64::from(budget.is_zero()))
}

/// What one `/proc/PID/stat` line says about CPU time, in clock ticks.
#[derive(Debug, Default, PartialEq, Eq)]
struct Stat {
    pgrp: i32,
    /// The process's own user and system time.
    own: u64,
    /// Its waited-for children's, with theirs.
    children: u64,
}

/// Parses a `/proc/PID/stat` line; the command name may hold anything, so
/// the fields are counted from its closing parenthesis.
fn parse_stat(line: &str) -> Option<Stat> {
    let rest = &line[line.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state (3), ppid (4), pgrp (5), ..., utime (14),
    // stime (15), cutime (16), cstime (17).
    let field = |n: usize| fields.get(n - 3)?.parse::<i64>().ok();
    let ticks = |n: usize| field(n).and_then(|v| u64::try_from(v).ok());
    Some(Stat {
        pgrp: i32::try_from(field(5)?).ok()?,
        own: ticks(14)?.saturating_add(ticks(15)?),
        children: ticks(16)?.saturating_add(ticks(17)?),
    })
}

fn ticks_per_second() -> u64 {
    // SAFETY: sysconf reads a constant of the C library; no memory is passed.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok().filter(|t| *t > 0).unwrap_or(100)
}

/// CPU time of the process group led by `leader`: every member's own, and
/// the leader's waited-for children's.
pub fn group_time(leader: Pid) -> io::Result<Duration> {
    let mut ticks = 0u64;
    for entry in fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        // A process may end between the listing and the read.
        let Ok(line) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some(stat) = parse_stat(&line) else {
            continue;
        };
        if stat.pgrp != leader.as_raw() {
            continue;
        }
        ticks = ticks.saturating_add(stat.own);
        if pid == leader.as_raw() {
            ticks = ticks.saturating_add(stat.children);
        }
    }
    let per_second = ticks_per_second();
    Ok(Duration::from_secs(ticks / per_second)
        + Duration::from_nanos((ticks % per_second) * 1_000_000_000 / per_second))
}

/// Resolves once the group led by `leader` has used more than `budget`.
pub async fn exceeded(leader: Pid, budget: Duration) {
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // Reading /proc is a blocking call, but a short one on a
        // filesystem in memory.
        match group_time(leader) {
            Ok(used) if used > budget => return,
            Ok(_) => {}
            Err(e) => {
                eprintln!(
                    "capsa-agent: cannot read CPU times ({e}); the RLIMIT_CPU backstop holds"
                );
                return std::future::pending().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_names_parse() {
        let line = "4242 (a) b) c) R 1 4242 4242 0 -1 4194304 100 0 0 0 \
                    250 30 7 3 20 0 1 0 100 1000 10";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                pgrp: 4242,
                own: 280,
                children: 10
            })
        );
        assert_eq!(parse_stat("4242 (x"), None);
        assert_eq!(parse_stat("4242 (x) R 1"), None);
    }

    #[test]
    fn the_backstop_rounds_up_to_whole_seconds() {
        assert_eq!(rlimit_seconds(Duration::from_millis(1)), 1);
        assert_eq!(rlimit_seconds(Duration::from_millis(1000)), 1);
        assert_eq!(rlimit_seconds(Duration::from_millis(1001)), 2);
        assert_eq!(rlimit_seconds(Duration::ZERO), 1);
    }

    #[test]
    fn a_busy_group_is_seen_using_cpu() {
        let before = group_time(Pid::this()).unwrap_or_default();
        // This test's process is its own group's leader only when run
        // alone; the count is of this group either way.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(300) {
            x = x.wrapping_mul(31).wrapping_add(1);
        }
        assert_ne!(x, 1);
        let pgrp = nix::unistd::getpgrp();
        let used = group_time(pgrp).unwrap();
        assert!(
            used >= Duration::from_millis(200),
            "{used:?} (before: {before:?})"
        );
    }
}

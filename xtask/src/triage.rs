//! Whose fault a failed nested run was: the test machine's or capsa's.
//!
//! `cargo xtask test` runs the microVM tests in a nested machine: QEMU's
//! TCG emulating AMD SVM, with Debian's KVM inside it running capsa's
//! machines. That emulation fails on its own now and then, and a failure
//! there must not make an intermittent capsa bug look like one (a retry
//! would hide it), nor the other way round. So a failed run is run again
//! only on evidence, and the evidence is printed:
//!
//! - the machine itself failed (it froze, or its kernel died): the job
//!   neither passed nor failed; see `nested::MachineFailed`;
//! - every test that failed failed because a microVM guest shut down (a
//!   triple fault), and every such shutdown in KVM's trace is
//!   [`Verdict::Emulator`] by the rule below.
//!
//! **The rule.** KVM's trace (the nested machine's `kvm_exit` and
//! `kvm_inj_exception` events) shows, for the vCPU that shut down, its
//! exit just before the shutdown. The shutdown is the emulated CPU's when:
//!
//! 1. that previous exit and the shutdown are at guest kernel addresses on
//!    the same 4 KiB page: the guest was executing that page a moment ago,
//!    so it was mapped, and at most one instruction of it ran in between;
//! 2. the event being delivered when the CPU gave up (the shutdown's
//!    `intr_info`) is an external interrupt, or a page fault raised by an
//!    instruction fetch of a page that is not present;
//! 3. KVM injected no exception into that vCPU between the two exits: the
//!    fault came from the CPU, not from the hypervisor.
//!
//! A guest cannot do that to itself: an instruction fetch from a page it
//! executed one instruction ago, or the delivery of an interrupt at a point
//! where one was just delivered, does not fail unless the CPU lost the
//! guest's translation or descriptor state across the VM exit and entry,
//! which is the (emulated) hardware's and L1 KVM's work, not the VMM's. A
//! capsa VMM bug that corrupted guest memory (the only guest state it
//! writes after boot is vsock RX buffers and used rings) would shut the
//! guest down at an arbitrary point instead, failing the rule.

use std::fmt;
use std::path::Path;
use std::process::Command;

/// One `kvm_exit` or `kvm_inj_exception` line of the trace.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Event {
    Exit {
        vcpu: u32,
        reason: String,
        rip: u64,
        intr_info: u32,
        error_code: u32,
    },
    Injected {
        thread: String,
    },
}

/// The thread a trace line came from (`vcpu0-432`), which identifies one
/// vCPU of one machine.
fn thread_of(line: &str) -> Option<&str> {
    line.split_whitespace().next()
}

fn hex(field: &str) -> Option<u64> {
    u64::from_str_radix(field.trim_start_matches("0x"), 16).ok()
}

/// Parses one trace line; `None` for anything else.
fn parse(line: &str) -> Option<(String, Event)> {
    let thread = thread_of(line)?.to_string();
    if line.contains(": kvm_inj_exception:") {
        return Some((thread.clone(), Event::Injected { thread }));
    }
    let rest = line.split(": kvm_exit: ").nth(1)?;
    let words: Vec<&str> = rest.split_whitespace().collect();
    let field = |name: &str| {
        words
            .iter()
            .position(|w| *w == name)
            .and_then(|i| words.get(i + 1))
            .copied()
    };
    Some((
        thread,
        Event::Exit {
            vcpu: field("vcpu")?.parse().ok()?,
            reason: field("reason")?.to_string(),
            rip: hex(field("rip")?)?,
            intr_info: u32::try_from(hex(field("intr_info")?)?).ok()?,
            error_code: u32::try_from(hex(field("error_code")?)?).ok()?,
        },
    ))
}

/// Where guest kernel addresses begin (the upper half of a 48-bit space).
const KERNEL_HALF: u64 = 0xffff_8000_0000_0000;

const INTR_VALID: u32 = 1 << 31;
const INTR_TYPE_EXTERNAL: u32 = 0;
const INTR_TYPE_EXCEPTION: u32 = 3;
const VECTOR_PF: u32 = 14;
/// Page-fault error code: the page was present; the access was a fetch.
const PF_PRESENT: u32 = 1 << 0;
const PF_FETCH: u32 = 1 << 4;

/// What the rule says about one shutdown.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The emulated CPU's (with the facts that make it so).
    Emulator(String),
    /// Not shown to be the emulator's: treat as capsa's (with why).
    NotShown(String),
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Emulator(why) => write!(f, "the emulated CPU's: {why}"),
            Verdict::NotShown(why) => write!(f, "not shown to be the emulator's: {why}"),
        }
    }
}

/// Applies the rule to the trace's last exits (`ring`, oldest first, the
/// shutdown among them: the ring stops at the first one).
fn judge(ring: &[(String, Event)]) -> Option<Verdict> {
    let at = ring
        .iter()
        .position(|(_, e)| matches!(e, Event::Exit { reason, .. } if reason == "shutdown"))?;
    let (thread, shutdown) = &ring[at];
    let Event::Exit {
        rip,
        intr_info,
        error_code,
        vcpu,
        ..
    } = shutdown
    else {
        return None;
    };
    let mut injected = false;
    let mut previous = None;
    for (t, e) in ring[..at].iter().rev() {
        if t != thread {
            continue;
        }
        match e {
            Event::Injected { .. } => injected = true,
            Event::Exit { rip, .. } => {
                previous = Some(*rip);
                break;
            }
        }
    }
    let not = |why: String| Some(Verdict::NotShown(why));
    let Some(previous) = previous else {
        return not(format!("no earlier exit of {thread} in the trace"));
    };
    if *rip < KERNEL_HALF || previous >> 12 != rip >> 12 {
        return not(format!(
            "vcpu {vcpu} shut down at {rip:#x}, not on the kernel page it last exited \
             from ({previous:#x})"
        ));
    }
    if injected {
        return not(format!(
            "KVM injected an exception into vcpu {vcpu} just before"
        ));
    }
    let kind = (intr_info >> 8) & 7;
    let vector = intr_info & 0xff;
    let delivering = if intr_info & INTR_VALID == 0 {
        return not(format!("vcpu {vcpu} was delivering no event"));
    } else if kind == INTR_TYPE_EXTERNAL {
        format!("an external interrupt (vector {vector:#x})")
    } else if kind == INTR_TYPE_EXCEPTION
        && vector == VECTOR_PF
        && error_code & PF_FETCH != 0
        && error_code & PF_PRESENT == 0
    {
        "a page fault on fetching a page that was not present".to_string()
    } else {
        return not(format!(
            "vcpu {vcpu} was delivering event {intr_info:#x} (error code {error_code:#x})"
        ));
    };
    Some(Verdict::Emulator(format!(
        "vcpu {vcpu} shut down at {rip:#x} delivering {delivering}, one exit after \
         running the same kernel page ({previous:#x}), with no exception injected by KVM"
    )))
}

/// Marks of the nested machine's report of guest shutdowns (see its init).
const SHUTDOWNS: &str = "capsa-nested: microVM guests that shut down (triple fault)";
const LAST_EXITS: &str = "capsa-nested: the last guest exits before the first of them:";

/// Why a failed nested run (its console's `transcript`) may run again, or
/// why not.
pub fn rerun_evidence(transcript: &str) -> Result<String, String> {
    let failed = failed_tests(transcript);
    if failed.is_empty() {
        return Err("no test reported a failure".into());
    }
    for (name, output) in &failed {
        if !output.contains("triple fault") {
            return Err(format!(
                "{name} failed for another reason than a guest's triple fault"
            ));
        }
    }
    let mut verdicts = Vec::new();
    for report in transcript.split(SHUTDOWNS).skip(1) {
        let Some((_, ring)) = report.split_once(LAST_EXITS) else {
            return Err("a shutdown report without KVM's last exits".into());
        };
        let events: Vec<(String, Event)> = ring.lines().filter_map(parse).collect();
        match judge(&events) {
            Some(Verdict::Emulator(why)) => verdicts.push(why),
            Some(Verdict::NotShown(why)) => return Err(format!("a guest shutdown {why}")),
            None => return Err("no shutdown exit in KVM's last exits".into()),
        }
    }
    if verdicts.is_empty() {
        return Err("the failures name triple faults, but KVM's trace has none".into());
    }
    Ok(format!(
        "{} test(s) failed on a microVM triple fault, each the emulated CPU's by the rule in \
         xtask/src/triage.rs: {}",
        failed.len(),
        verdicts.join("; ")
    ))
}

/// The failed tests of libtest's output and what each printed.
fn failed_tests(transcript: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in transcript.lines() {
        if let Some(name) = line
            .strip_prefix("---- ")
            .and_then(|l| l.strip_suffix(" stdout ----"))
        {
            out.extend(current.take());
            current = Some((name.to_string(), String::new()));
        } else if line == "failures:" || line.starts_with("test result:") {
            out.extend(current.take());
        } else if let Some((_, text)) = &mut current {
            text.push_str(line);
            text.push('\n');
        }
    }
    out.extend(current);
    // A test that failed without printing (a bare FAILED line) counts too.
    for line in transcript.lines() {
        if let Some(name) = line
            .strip_prefix("test ")
            .and_then(|l| l.strip_suffix(" ... FAILED"))
        {
            if !out.iter().any(|(n, _)| n == name) {
                out.push((name.to_string(), String::new()));
            }
        }
    }
    out
}

/// The guest kernel addresses `rip 0x...` in `transcript` (exit traces,
/// vCPU whereabouts), each with the kernel symbol it falls in, read from
/// `vmlinux` with `nm`; `None` when there are none or `nm` cannot say.
pub fn symbolize(transcript: &str, vmlinux: &Path) -> Option<String> {
    let mut rips: Vec<u64> = transcript
        .split("rip ")
        .skip(1)
        .filter_map(|rest| hex(rest.split_whitespace().next()?))
        .filter(|rip| *rip >= KERNEL_HALF)
        .collect();
    rips.sort_unstable();
    rips.dedup();
    if rips.is_empty() {
        return None;
    }
    let out = Command::new("nm").arg("-n").arg(vmlinux).output().ok()?;
    let symbols = parse_nm(&String::from_utf8_lossy(&out.stdout));
    if symbols.is_empty() {
        return None;
    }
    let lines: Vec<String> = rips
        .iter()
        .map(|rip| match lookup(&symbols, *rip) {
            Some((name, offset)) => format!("{rip:#x} = {name}+{offset:#x}"),
            None => format!("{rip:#x} = ?"),
        })
        .collect();
    Some(lines.join("\n"))
}

/// Text symbols of `nm -n` output, by address.
fn parse_nm(out: &str) -> Vec<(u64, String)> {
    out.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let address = u64::from_str_radix(words.next()?, 16).ok()?;
            let kind = words.next()?;
            let name = words.next()?;
            matches!(kind, "T" | "t" | "W" | "w").then(|| (address, name.to_string()))
        })
        .collect()
}

/// The symbol `address` falls in, and how far into it.
fn lookup(symbols: &[(u64, String)], address: u64) -> Option<(&str, u64)> {
    let at = symbols
        .partition_point(|(a, _)| *a <= address)
        .checked_sub(1)?;
    let (start, name) = &symbols[at];
    Some((name, address - start))
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERRUPT: &str = include_str!("../testdata/shutdown-interrupt-delivery.txt");
    const FETCH: &str = include_str!("../testdata/shutdown-fetch-fault.txt");

    #[test]
    fn the_two_shutdowns_seen_are_the_emulators() {
        let why = rerun_evidence(INTERRUPT).unwrap();
        assert!(why.contains("external interrupt (vector 0x21)"), "{why}");
        let why = rerun_evidence(FETCH).unwrap();
        assert!(why.contains("page fault on fetching"), "{why}");
        assert!(why.contains("0xffffffff81149fa9"), "{why}");
    }

    #[test]
    fn a_failure_without_a_triple_fault_is_capsas() {
        let other = FETCH.replace(
            "the VM shut down (triple fault)",
            "the agent did not answer",
        );
        let why = rerun_evidence(&other).unwrap_err();
        assert!(why.contains("another reason"), "{why}");
        assert!(rerun_evidence("test result: ok.").is_err());
    }

    #[test]
    fn an_injected_exception_or_a_jump_elsewhere_is_not_shown() {
        // KVM injected the fault: a hypervisor's (or VMM's) decision.
        let last = FETCH.rfind("           vcpu0-224").unwrap();
        let injected = format!(
            "{}           vcpu0-224     [000] .....    78.467400: kvm_inj_exception: #PF (0x10)\n{}",
            &FETCH[..last],
            &FETCH[last..]
        );
        let why = rerun_evidence(&injected).unwrap_err();
        assert!(why.contains("injected"), "{why}");
        // The shutdown on another page than the last exit.
        let elsewhere = FETCH.replace(
            "reason shutdown rip 0xffffffff81149fa9",
            "reason shutdown rip 0xffffffff81200000",
        );
        let why = rerun_evidence(&elsewhere).unwrap_err();
        assert!(why.contains("not on the kernel page"), "{why}");
        // A general protection fault being delivered.
        let gp = FETCH.replace("intr_info 0x80000b0e", "intr_info 0x80000b0d");
        assert!(rerun_evidence(&gp).is_err());
        // A present page: a protection fault, not a lost mapping.
        let present = FETCH.replace(
            "intr_info 0x80000b0e error_code 0x00000010",
            "intr_info 0x80000b0e error_code 0x00000011",
        );
        assert!(rerun_evidence(&present).is_err());
    }

    #[test]
    fn addresses_find_their_symbols() {
        let symbols = parse_nm(
            "ffffffff81000000 T _text\nffffffff810b26da T vma_merge\n\
             ffffffff81149f98 t io_serial_out\nffffffff81200000 D some_data\n",
        );
        assert_eq!(symbols.len(), 3);
        assert_eq!(
            lookup(&symbols, 0xffffffff810b2887),
            Some(("vma_merge", 0x1ad))
        );
        assert_eq!(
            lookup(&symbols, 0xffffffff81149fa9),
            Some(("io_serial_out", 0x11))
        );
        assert_eq!(lookup(&symbols, 0x1000), None);
    }

    #[test]
    fn failures_name_the_trace_and_a_trace_needs_a_failure() {
        let cut = FETCH.split(SHUTDOWNS).next().unwrap();
        let why = rerun_evidence(cut).unwrap_err();
        assert!(why.contains("trace has none"), "{why}");
    }
}

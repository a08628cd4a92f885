//! The jobs and the script that runs them inside the machine, in its
//! chroot, one after another.

use std::fmt::Write as _;
use std::path::PathBuf;

/// How long one job may run in the machine before `timeout` ends it: a
/// hung test fails with its name instead of using up the whole deadline.
const JOB_TIMEOUT_SECS: u32 = 20 * 60;

/// One thing to run inside the machine: a command line, the folder it
/// starts in, and what it is called in progress lines.
pub struct Job {
    pub title: String,
    pub dir: PathBuf,
    pub argv: Vec<String>,
}

/// The script the L1 machine runs in its chroot: the environment, then each
/// job in its folder, stopping at the first failure; the exit code goes to
/// `$capsa_scratch/status`.
pub(super) fn job_script(env: &[(String, String)], jobs: &[Job]) -> String {
    // Temporary files, HOME and so capsa's compile cache go to the
    // machine's own memory: /tmp is the host's, read-only, when the
    // workspace lives there.
    let mut s = format!(
        "#!/bin/sh\nexport TMPDIR=/run/capsa-tmp\n\
         export HOME={MACHINE_HOME} XDG_CACHE_HOME={MACHINE_HOME}/.cache\n"
    );
    for (key, value) in env {
        let _ = writeln!(s, "export {key}={}", quote(value));
    }
    s.push_str("code=0\n");
    for job in jobs {
        let argv: Vec<String> = job.argv.iter().map(|a| quote(a)).collect();
        let _ = writeln!(
            s,
            "if [ $code = 0 ]; then\n  echo {}\n  cd {} && timeout -k 10 {JOB_TIMEOUT_SECS} {}\n  \
             code=$?\n  [ $code = 124 ] && echo {}\nfi",
            quote(&format!("==> [nested] {}", job.title)),
            quote(&job.dir.to_string_lossy()),
            argv.join(" "),
            quote(&format!(
                "==> [nested] {} did not finish within {JOB_TIMEOUT_SECS} s and was killed",
                job.title
            ))
        );
    }
    s.push_str("exit $code\n");
    s
}

/// The jobs' home folder in the L1 machine, on its /run tmpfs (the
/// machine's `/init` makes it).
const MACHINE_HOME: &str = "/run/capsa-home";

/// Single-quotes `s` for a POSIX shell.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::process::{Command, Stdio};

    use super::*;

    #[test]
    fn the_job_script_quotes_everything_and_stops_at_the_first_failure() {
        let env = [("CAPSA_X".to_string(), "it's $HOME".to_string())];
        let jobs = [
            Job {
                title: "one".into(),
                dir: "/a b".into(),
                argv: vec!["/bin/echo".into(), "$(reboot)".into()],
            },
            Job {
                title: "two".into(),
                dir: "/".into(),
                argv: vec!["/bin/false".into()],
            },
        ];
        let script = job_script(&env, &jobs);
        assert!(
            script.contains(r"export CAPSA_X='it'\''s $HOME'"),
            "{script}"
        );
        assert!(
            script.contains("cd '/a b' && timeout -k 10 1200 '/bin/echo' '$(reboot)'"),
            "{script}"
        );
        assert_eq!(script.matches("if [ $code = 0 ]").count(), 2, "{script}");
        // The compile cache is writable whatever /tmp is.
        assert!(
            script.contains("export HOME=/run/capsa-home XDG_CACHE_HOME=/run/capsa-home/.cache"),
            "{script}"
        );
        assert!(script.ends_with("exit $code\n"));
    }

    #[test]
    fn the_job_script_runs_under_sh() {
        let dir = std::env::temp_dir().join(format!("capsa-nested-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        let jobs = [
            Job {
                title: "first".into(),
                dir: dir.clone(),
                argv: vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    format!("printf '%s' \"$CAPSA_X\" > {}", out.display()),
                ],
            },
            Job {
                title: "fails".into(),
                dir: dir.clone(),
                argv: vec!["/bin/sh".into(), "-c".into(), "exit 3".into()],
            },
            Job {
                title: "never".into(),
                dir: dir.clone(),
                argv: vec!["/bin/sh".into(), "-c".into(), "exit 9".into()],
            },
        ];
        let env = [("CAPSA_X".to_string(), "a 'b' $c".to_string())];
        let script = dir.join("run.sh");
        fs::write(&script, job_script(&env, &jobs)).unwrap();
        let status = Command::new("/bin/sh")
            .arg(&script)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        let written = fs::read_to_string(&out).unwrap();
        let _ = fs::remove_dir_all(&dir);
        assert_eq!(written, "a 'b' $c");
        assert_eq!(status.code(), Some(3));
    }
}

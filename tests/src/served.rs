//! `capsa serve` as a process, for the tests that reach it from outside.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capsa::serve::Address;

use crate::capsa_bin;

/// A fresh folder for sockets and token files.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("capsa-serve-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A `capsa serve` process, killed when dropped.
pub struct Served {
    pub child: Child,
    pub address: Address,
    log: Arc<Mutex<String>>,
}

impl Served {
    pub fn start(args: &[&str]) -> Served {
        Self::try_start(args).unwrap_or_else(|log| panic!("capsa serve did not start: {log}"))
    }

    /// Starts `capsa serve ARGS` and waits for its "serving on" line; on
    /// failure, returns what it printed.
    pub fn try_start(args: &[&str]) -> Result<Served, String> {
        Self::try_start_with(args, &[])
    }

    /// As [`Served::try_start`], with `env` added to its environment.
    pub fn try_start_with(args: &[&str], env: &[(&str, &str)]) -> Result<Served, String> {
        let mut child = Command::new(capsa_bin())
            .arg("serve")
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("capsa serve");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(a) = line.strip_prefix("capsa: serving on ") {
                    let _ = tx.send(a.to_string());
                }
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => Ok(Served {
                child,
                address: a.parse().unwrap(),
                log,
            }),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(100));
                let log = log.lock().unwrap().clone();
                Err(log)
            }
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the log contains `what`.
    pub fn wait_log(&self, what: &str) {
        let start = Instant::now();
        while !self.log().contains(what) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no {what:?} in the log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    }

    /// Waits for the process to exit, at most 20 seconds.
    pub fn exit_status(&mut self) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "capsa serve did not exit:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `f` with a current-thread runtime and a LocalSet.
pub fn local<F: std::future::Future>(f: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&rt, f)
}

//! What the host learnt about this machine's KVM: whether it runs guests
//! natively or emulates them, and how fast. A KVM microVM is booted with
//! the compatibility CPU profile and timer arguments when KVM is emulated.

/// The KVM probe's result, once per host. The probe runs a guest for a
/// while, so it runs on a blocking thread, never on the thread that serves
/// every guest.
pub struct Probed {
    result: tokio::sync::OnceCell<Option<capsa_microvm::Probe>>,
    probe: fn() -> Result<capsa_microvm::Probe, capsa_microvm::ProbeError>,
}

impl Default for Probed {
    fn default() -> Self {
        Probed {
            result: tokio::sync::OnceCell::new(),
            probe: capsa_microvm::probe,
        }
    }
}

impl Probed {
    /// The probe's result, probing on the first call; `None` if it failed.
    pub(super) async fn get(&self) -> Option<capsa_microvm::Probe> {
        let probe = self.probe;
        *self
            .result
            .get_or_init(|| async move {
                match tokio::task::spawn_blocking(probe).await {
                    Ok(result) => Self::report(result),
                    Err(e) => {
                        tracing::warn!("KVM probe failed: {e}");
                        None
                    }
                }
            })
            .await
    }

    fn report(
        result: Result<capsa_microvm::Probe, capsa_microvm::ProbeError>,
    ) -> Option<capsa_microvm::Probe> {
        match result {
            Ok(p) => {
                tracing::info!(
                    "KVM probe: {:.1} ns per loop iteration ({})",
                    p.ns_per_iteration,
                    if p.emulated {
                        "emulated: compatibility CPU profile"
                    } else {
                        "native"
                    }
                );
                Some(p)
            }
            Err(e) => {
                tracing::warn!("KVM probe failed: {e}");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::thread::ThreadId;

    use super::*;
    use crate::vm::tests::on_this_thread;

    static PROBED_ON: Mutex<Option<ThreadId>> = Mutex::new(None);

    fn recording_probe() -> Result<capsa_microvm::Probe, capsa_microvm::ProbeError> {
        *PROBED_ON.lock().unwrap() = Some(std::thread::current().id());
        Ok(capsa_microvm::Probe {
            emulated: true,
            ns_per_iteration: 1000.0,
        })
    }

    /// The probe runs a guest for a while; on the host's thread it would
    /// stall every guest meanwhile.
    #[test]
    fn the_kvm_probe_runs_off_the_host_thread_once() {
        let probed = Probed {
            result: tokio::sync::OnceCell::new(),
            probe: recording_probe,
        };
        let host_thread = std::thread::current().id();
        let first = on_this_thread(probed.get());
        assert!(first.is_some_and(|p| p.emulated));
        let probed_on = PROBED_ON.lock().unwrap().take();
        assert!(probed_on.is_some_and(|t| t != host_thread), "{probed_on:?}");
        on_this_thread(probed.get());
        assert_eq!(*PROBED_ON.lock().unwrap(), None, "probed twice");
    }
}

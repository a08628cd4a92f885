//! The Python client's environment: a virtualenv in the target folder with
//! `pycapnp` from PyPI, for the Python example's test and benchmark.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::cmd::{run, succeeds};

/// The virtualenv's Python, created (once) with `pycapnp` installed.
pub fn ensure_venv(target: &Path) -> Result<PathBuf> {
    let venv = target.join("python");
    let python = venv.join("bin/python");
    if python.exists() && succeeds(Command::new(&python).args(["-c", "import capnp"])) {
        return Ok(python);
    }
    if !succeeds(Command::new("python3").args(["-c", "import venv, ensurepip"])) {
        // Debian ships python3 without ensurepip, which `venv` needs: it
        // is in python3-venv (which brings python3 too).
        crate::tools::ensure_deb("python3-venv", "the Python client's virtualenv")?;
    }
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv))
        .context("creating a virtualenv needs python3 with its venv module")?;
    run(Command::new(&python).args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "pycapnp",
    ]))
    .context("installing pycapnp from PyPI into the virtualenv")?;
    Ok(python)
}

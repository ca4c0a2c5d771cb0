//! A small disk for one node's database: a tmpfs mounted inside the history's directory (needs
//! root; when mounting is not permitted the reason is returned and the disk-full faults of the
//! history are reported as skipped, never pretended). Filling it with a ballast file makes the
//! node's and the clients' writes fail with "database or disk is full"; removing the ballast
//! gives the space back. Dropping it unmounts.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Size of the tmpfs. Large enough for a history's database and WAL (the WAL alone grows to
/// about 4 MiB before SQLite checkpoints it), small enough to fill in a moment.
pub const SMALL_DISK_MB: u64 = 24;
const BALLAST: &str = "ballast";

#[derive(Debug)]
pub struct SmallDisk {
    pub dir: PathBuf,
    mounted: bool,
}

fn run(command: &mut Command) -> Result<(), String> {
    match command.output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "{:?} failed with {}: {}",
            command,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!("cannot run {command:?}: {e}")),
    }
}

impl SmallDisk {
    /// Mounts a tmpfs of [`SMALL_DISK_MB`] at `dir` (created). The error says why not.
    pub fn mount(dir: &Path) -> Result<SmallDisk, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={SMALL_DISK_MB}m"))
            .arg("tmpfs")
            .arg(dir))?;
        Ok(SmallDisk {
            dir: dir.to_path_buf(),
            mounted: true,
        })
    }

    /// Fills the disk with a ballast file until the file system refuses more; returns the bytes
    /// written.
    pub fn fill(&self) -> io::Result<u64> {
        let mut file = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.join(BALLAST))?;
        let mut written = 0u64;
        for chunk in [1 << 20, 4096, 512] {
            let block = vec![0u8; chunk];
            loop {
                match file.write_all(&block).and_then(|_| file.flush()) {
                    Ok(()) => written += chunk as u64,
                    Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                    Err(e) if e.kind() == io::ErrorKind::WriteZero => break,
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(written)
    }

    /// Removes the ballast.
    pub fn free(&self) -> io::Result<()> {
        match std::fs::remove_file(self.dir.join(BALLAST)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Unmounts (lazily if something still holds it). Call after the processes are gone.
    pub fn unmount(&mut self) {
        if !self.mounted {
            return;
        }
        self.mounted = false;
        if run(Command::new("umount").arg(&self.dir)).is_err() {
            let _ = run(Command::new("umount").arg("-l").arg(&self.dir));
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        self.unmount();
    }
}

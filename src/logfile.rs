//! A log file that can be reopened (after logrotate moved it) without restarting the server.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The open log file; cheap to share between the logger and the signal thread.
#[derive(Clone, Debug)]
pub struct LogFile {
    path: PathBuf,
    file: Arc<Mutex<File>>,
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl LogFile {
    pub fn open(path: &Path) -> io::Result<LogFile> {
        Ok(LogFile {
            path: path.to_owned(),
            file: Arc::new(Mutex::new(open_append(path)?)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the path again, so that lines go to the new file once the old one was moved.
    pub fn reopen(&self) -> io::Result<()> {
        let fresh = open_append(&self.path)?;
        *self.file.lock().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }
}

impl Write for LogFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.lock().unwrap_or_else(|p| p.into_inner()).flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopen_follows_the_path() {
        let dir = std::env::temp_dir().join(format!("phpmq-logfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("phpmq.log");
        let mut log = LogFile::open(&path).unwrap();
        writeln!(log, "first").unwrap();
        std::fs::rename(&path, dir.join("phpmq.log.1")).unwrap();
        writeln!(log, "still to the moved file").unwrap();
        log.reopen().unwrap();
        writeln!(log, "second").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "second\n");
        assert_eq!(
            std::fs::read_to_string(dir.join("phpmq.log.1")).unwrap(),
            "first\nstill to the moved file\n"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

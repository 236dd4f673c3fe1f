//! What the operating system tells about this process, read from `/proc` (Linux): the server's
//! resident memory for the console, and a thread's disk writes for the mirror's report.
//! Elsewhere, or where `/proc` says nothing, the answer is `None`.

use std::fs;

/// The process's resident memory, in bytes.
pub fn resident_memory() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Bytes the calling thread has passed to `write(2)` and the like so far.
pub fn written_by_this_thread() -> Option<u64> {
    let io = fs::read_to_string("/proc/thread-self/io").ok()?;
    let line = io.lines().find(|l| l.starts_with("wchar:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn proc_tells_memory_and_writes() {
        assert!(resident_memory().is_some_and(|bytes| bytes > 0));
        let before = written_by_this_thread().expect("wchar in /proc/thread-self/io");
        let path = std::env::temp_dir().join(format!("phpmq-system-{}", std::process::id()));
        fs::write(&path, [0u8; 4096]).expect("write a temp file");
        let _ = fs::remove_file(&path);
        let after = written_by_this_thread().expect("wchar in /proc/thread-self/io");
        assert!(after >= before + 4096, "{before} then {after}");
    }
}

//! What the operating system tells about this process, read from `/proc` (Linux): the server's
//! resident memory for the console, and a thread's disk writes for the mirror's report.
//! Elsewhere, or where `/proc` says nothing, the answer is `None`. Also how the server's
//! threads are scheduled.

use std::fs;
use std::io;

/// How the server's threads are scheduled (Linux; elsewhere they run as the system decides).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheduling {
    /// `SCHED_BATCH`: a thread that a client's bytes wake does not preempt the program that is
    /// running; it runs at the scheduler's next turn, often on the other core. A client that
    /// pipelines then goes on writing, and the server reads more per wake-up.
    Batch,
    /// The policy the server was started with (`SCHED_OTHER` unless `chrt` or the service
    /// manager chose another), left alone.
    Normal,
}

impl std::str::FromStr for Scheduling {
    type Err = String;

    fn from_str(text: &str) -> Result<Scheduling, String> {
        match text {
            "batch" => Ok(Scheduling::Batch),
            "normal" => Ok(Scheduling::Normal),
            _ => Err(format!("unknown scheduling {text:?}: use batch or normal")),
        }
    }
}

/// Schedules the calling thread, and every thread it starts from then on (they inherit it),
/// as `scheduling` says. `SCHED_BATCH` needs no privileges; `Normal` changes nothing.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn set_scheduling(scheduling: Scheduling) -> io::Result<()> {
    if scheduling == Scheduling::Normal {
        return Ok(());
    }
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param that outlives the call; pid 0 is this thread.
    let result = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Elsewhere (other systems, or musl, whose `sched_setscheduler` only says ENOSYS) the threads
/// run as the system decides.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn set_scheduling(_scheduling: Scheduling) -> io::Result<()> {
    Ok(())
}

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
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn a_thread_and_those_it_starts_take_the_scheduling() {
        // SAFETY (each call below): no arguments; returns the calling thread's policy.
        #[allow(unsafe_code)]
        fn policy() -> i32 {
            unsafe { libc::sched_getscheduler(0) }
        }
        // In threads of their own: the policy stays with the thread that set it.
        let normal = std::thread::spawn(|| {
            set_scheduling(Scheduling::Normal).unwrap();
            policy()
        })
        .join()
        .unwrap();
        let batch = std::thread::spawn(|| {
            set_scheduling(Scheduling::Batch).expect("SCHED_BATCH needs no privileges");
            let child = std::thread::spawn(policy).join().unwrap();
            (policy(), child)
        })
        .join()
        .unwrap();
        assert_eq!(normal, libc::SCHED_OTHER, "normal leaves the default alone");
        assert_eq!(batch, (libc::SCHED_BATCH, libc::SCHED_BATCH));
        assert_eq!("batch".parse(), Ok(Scheduling::Batch));
        assert!("fifo".parse::<Scheduling>().is_err());
    }

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
